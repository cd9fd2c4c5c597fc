"""Context fields of log records: which peer, job or channel a line is about.

Log calls name what a line concerns with ``extra=fields(peer=..., job=...)`` instead of
baking the ids into the message, so a log pipeline can filter and join on them: under
``cocoon-node --log-json`` each field is a top-level key of the line's JSON object, and in
text mode the line ends with ``peer=12D3KooW... job=7`` (see ``nodes/logs.py``).

The fields (a fixed set, so a formatter knows what to pick from a record):

- ``node``: the peer id of the node writing the line (bound once by the program).
- ``peer``: the other peer a line is about (the worker a job ran on, the client that
  paid); in a node's own start-up lines, the node itself.
- ``job``: a job's id (per job stream, so read it with ``peer``).
- ``channel``: a payment channel: its contract address, or its channel id in hex where
  the side writing the line knows it by id (a worker's).
- ``model``: a model's name as its worker announces it, or its id in hex.
- ``addr``: an address: a multiaddr listened on, or an HTTP URL served.
- ``wallet``: a TON wallet address (user-friendly form where one was shown).
- ``nanoton``: an amount of nanoton.

Pure: no I/O, no logging configuration.
"""

from __future__ import annotations

from .identity import peer_id_to_str

FIELDS: tuple[str, ...] = ("node", "peer", "job", "channel", "model", "addr", "wallet", "nanoton")


def fields(
    *,
    node: bytes | str | None = None,
    peer: bytes | str | None = None,
    job: int | None = None,
    channel: int | str | None = None,
    model: bytes | str | None = None,
    addr: str | None = None,
    wallet: str | None = None,
    nanoton: int | None = None,
) -> dict[str, object]:
    """The ``extra=`` of a log call: the given fields, ids in their printed forms (a binary
    peer id as its base58 string, a channel id in hex, a model id in hex); None and empty
    ones (an id not known yet) left out."""
    given: dict[str, object] = {
        "node": _peer(node),
        "peer": _peer(peer),
        "job": job,
        "channel": f"{channel:x}" if isinstance(channel, int) else channel,
        "model": model.hex() if isinstance(model, bytes) else model,
        "addr": addr,
        "wallet": wallet,
        "nanoton": nanoton,
    }
    return {k: v for k, v in given.items() if v is not None and v != ""}


def _peer(peer_id: bytes | str | None) -> str | None:
    if isinstance(peer_id, bytes):
        return peer_id_to_str(peer_id) if peer_id else None
    return peer_id or None
