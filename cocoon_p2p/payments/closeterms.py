"""The cooperative close each party will sign (sans-IO).

A cooperative close pays each party a final split at once, signed by both. The
worker proposes, and signs, only "everything our newest voucher says is ours";
the client proposes, and signs, only what its vouchers sent; each checks the
other's proposal against its own books before countersigning.
"""

from __future__ import annotations

from . import frames as pf
from . import messages as m
from .store import ChannelTerms
from .vouchers import SignedSemiChannel, VoucherIssuer


def payer_terms(issuer: VoucherIssuer) -> m.CloseTerms:
    """The client's split: the worker gets what our vouchers sent, we get the rest."""
    return m.CloseTerms(issuer.channel_id, issuer.deposit_a - issuer.sent, issuer.sent, max(issuer.seqno, 1), 1)


def payee_terms(terms: ChannelTerms, received: int, newest: SignedSemiChannel | None) -> m.CloseTerms:
    """The worker's split: everything its newest voucher (``received`` in all) says is its."""
    seqno_a = newest.state.body.seqno if newest else 0
    return m.CloseTerms(terms.channel_id, terms.deposit_a - received, terms.deposit_b + received, max(seqno_a, 1), 1)


def proposal_refusal(issuer: VoucherIssuer, proposal: pf.CloseProposal, worker_key: bytes) -> pf.PayError | None:
    """Why the client must not countersign the worker's ``proposal`` (None: it may).

    The worker may claim no more than our vouchers sent it, the split must add up
    to the deposit, the seqnos must pass the committed ones, and the worker must
    have signed exactly these terms.
    """
    terms = m.CloseTerms(issuer.channel_id, proposal.balance_a, proposal.balance_b, proposal.seqno_a, proposal.seqno_b)
    if proposal.balance_b > issuer.sent or proposal.balance_a + proposal.balance_b != issuer.deposit_a:
        split = f"{proposal.balance_a}/{proposal.balance_b}"
        return pf.PayError(pf.PayErrorCode.CLOSE, f"the split {split} is not ours")
    if min(proposal.seqno_a, proposal.seqno_b) < 1:
        return pf.PayError(pf.PayErrorCode.CLOSE, "seqnos must be above the committed ones")
    if not m.signed_by(terms.body(), proposal.signature_b, worker_key):
        return pf.PayError(pf.PayErrorCode.BAD_SIGNATURE, "the close is not signed by the worker")
    return None
