"""The ground floor: what every layer shares and nothing else.

Decides: the error hierarchy (:mod:`.errors`), canonical msgpack with size limits
(:mod:`.wire`), length-prefixed framing (:mod:`.framing`), node identity and
signatures (:mod:`.identity`, :mod:`.signed`), durable file writes
(:mod:`.durable`), the clock (:mod:`.clock`) and counters (:mod:`.metrics`).
Leaves to others: every protocol. Imports no I/O library (no trio, no libp2p).
"""
