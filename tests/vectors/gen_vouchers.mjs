// Generates tests/vectors/vouchers.json with @ton/core 0.63.1 + @ton/crypto 3.3.0, the
// reference implementation, so the Python cells can be checked without Node:
//   npm install @ton/core@0.63.1 @ton/crypto@3.3.0 && node gen_vouchers.mjs > vouchers.json
// Layouts as tonweb's PaymentUtils.js (createSemiChannelBody/State, createSignedSemiChannelState).
import { beginCell } from "@ton/core";
import { keyPairFromSeed, sign } from "@ton/crypto";

const TAG_STATE = 0x43685374;
const body = (seqno, sent) => beginCell().storeUint(seqno, 64).storeCoins(sent).storeBit(0);
const cases = [
  { seed: 1, channelId: 0x1234n, seqno: 1n, sent: 0n, cp: null },
  { seed: 2, channelId: (1n << 128n) - 1n, seqno: 7n, sent: 1_000_000_000n, cp: [3n, 5n] },
  { seed: 3, channelId: 0xc0c00n, seqno: (1n << 64n) - 1n, sent: (1n << 120n) - 1n, cp: [0n, 0n] },
];
const out = [];
for (const c of cases) {
  const kp = keyPairFromSeed(Buffer.alloc(32, c.seed));
  const b = beginCell().storeUint(TAG_STATE, 32).storeUint(c.channelId, 128).storeBuilder(body(c.seqno, c.sent));
  b.storeMaybeRef(c.cp ? body(c.cp[0], c.cp[1]).endCell() : null);
  const state = b.endCell();
  const signature = sign(state.hash(), kp.secretKey);
  const signed = beginCell().storeBuffer(signature).storeSlice(state.beginParse()).endCell();
  out.push({
    seed_byte: c.seed,
    channel_id: c.channelId.toString(),
    seqno: c.seqno.toString(),
    sent: c.sent.toString(),
    counterparty: c.cp ? c.cp.map(String) : null,
    state_hash: state.hash().toString("hex"),
    signature: signature.toString("hex"),
    signed_boc: signed.toBoc().toString("hex"),
  });
}
console.log(JSON.stringify({ comment: "SignedSemiChannel vectors from @ton/core 0.63.1 (gen_vouchers.mjs)", cases: out }, null, 1));
