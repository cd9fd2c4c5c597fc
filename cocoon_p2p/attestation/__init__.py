"""Attestation: whether a peer proves it runs an approved image inside a TEE.

Decides: how a worker binds hardware evidence (an Intel TDX quote) to its PeerId
(:mod:`.binding`), where that evidence comes from (:mod:`.sources`: the kernel's
configfs TSM report interface, or dstack's guest agent), how a client judges it
(:mod:`.verifier` over dcap-qvl, against a :mod:`.policy` an operator writes), and
how long a judgement stands (:mod:`.collateral`, :mod:`.book`).

Leaves to others: carrying the small claim in announcements and records (overlay's
:mod:`~cocoon_p2p.overlay.teeclaim`), choosing workers (jobs, through the
``TeeGate`` port), and banning peers (overlay's guard). A peer of jobs and
payments: none of the three imports another.
"""
