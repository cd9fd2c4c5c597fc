// A js-libp2p peer (TCP, Noise, yamux, identify, ping) for the interop test.
// Usage: node --import ./polyfill.mjs peer.mjs <multiaddr of a cocoon node>
// Prints JSON lines: {"listen": ...}, then {"ping_ms": ..., "protocols": [...]},
// and stays up (so the cocoon node can dial back) until stdin closes.
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { multiaddr } from '@multiformats/multiaddr'

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: { identify: identify(), ping: ping() }
})
out({ listen: node.getMultiaddrs()[0].toString() })

const target = multiaddr(process.argv[2])
const rtt = await node.services.ping.ping(target)
const peerId = node.getConnections()[0].remotePeer
let protocols = []
for (let i = 0; i < 100 && protocols.length === 0; i++) {
  try { protocols = (await node.peerStore.get(peerId)).protocols } catch {}
  if (protocols.length === 0) await new Promise(r => setTimeout(r, 50))
}
out({ ping_ms: rtt, remote_peer: peerId.toString(), protocols })

process.stdin.resume()
process.stdin.on('end', async () => { await node.stop(); process.exit(0) })
