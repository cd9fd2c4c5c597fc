"""Protocol identifiers and topic names that cocoon-p2p speaks, with versions.

A breaking wire change bumps the trailing version, so old and new peers fail
negotiation cleanly instead of misreading each other.
"""

from __future__ import annotations

ANNOUNCE_TOPIC = "/cocoon/announce/1"
# Identify lists this: the node's overlay protocols, so peers (and go/rust/js
# libp2p tools) can see what a cocoon peer speaks.
INFO_PROTOCOL = "/cocoon/info/1"
DHT_NAMESPACE = "cocoon"
GOSSIPSUB_PROTOCOL = "/meshsub/1.1.0"
