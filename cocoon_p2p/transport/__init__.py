"""How bytes move between two peers: a py-libp2p host over TCP, Noise, and our yamux.

Decides: how a host is built (:mod:`.host`), the Noise data phase
(:mod:`.noise`), stream multiplexing as a sans-IO core (:mod:`.yamux`) with its
trio adapter (:mod:`.muxer`), and the small tools they share (:mod:`.fastlock`,
:mod:`.reassembly`). Leaves to others: what the streams carry and whom to dial.
"""
