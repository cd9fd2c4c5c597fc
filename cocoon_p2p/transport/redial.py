"""A stream to a peer whose connections have all just closed dials it again (trio side).

py-libp2p 0.8.1's ``Swarm.new_stream`` dials only when it lists no connection to the
peer; it then drops the closed ones and, when none is left, fails with "No valid
connections available". A connection is marked closed as its close begins and leaves
the swarm's list only when its muxer has finished closing, so in that window (a relayed
connection trimmed once a direct one exists, a peer that went away) a new job stream
failed instead of dialing: seen in CI as a client's ``worker-lost`` on a NATed worker.
Closed connections are dropped from the list first, so the swarm dials.
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID


def redial_past_closed(host: IHost) -> None:
    """Make ``host``'s swarm forget a peer's closed connections before opening a stream to
    it (instance attribute: this host only). The swarm keeps no other record of them (no
    resource manager: see :mod:`.host`); their own clean-up finds them gone."""
    swarm: Any = host.get_network()
    new_stream = swarm.new_stream

    async def new_stream_on_live(peer_id: ID) -> INetStream:
        for conn in swarm.get_connections(peer_id):
            if conn.is_closed:
                swarm.remove_conn(conn)
        stream: INetStream = await new_stream(peer_id)
        return stream

    swarm.new_stream = new_stream_on_live
