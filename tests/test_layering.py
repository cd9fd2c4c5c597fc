"""The protocol logic is sans-IO: importing it must not pull in trio or libp2p,
so the simulator can run it unchanged in virtual time."""

import subprocess
import sys

PURE_MODULES = [
    "cocoon_p2p",
    "cocoon_p2p.errors",
    "cocoon_p2p.wire",
    "cocoon_p2p.identity",
    "cocoon_p2p.signed",
    "cocoon_p2p.capability",
    "cocoon_p2p.announcement",
    "cocoon_p2p.directory",
    "cocoon_p2p.peerscore",
    "cocoon_p2p.peerset",
    "cocoon_p2p.protocols",
    "cocoon_p2p.tensors",
    "cocoon_p2p.jobframes",
    "cocoon_p2p.jobconn",
    "cocoon_p2p.batching",
    "cocoon_p2p.routing",
    "cocoon_p2p.models",
    "cocoon_p2p.vouchers",
    "cocoon_p2p.channel_messages",
    "cocoon_p2p.payframes",
    "cocoon_p2p.settlement",
    "cocoon_p2p.metrics",
    "cocoon_p2p.openai_api",
    "cocoon_p2p.yamux",
    "cocoon_p2p.reassembly",
]


def test_protocol_modules_do_not_import_io_libraries() -> None:
    code = (
        "import sys\n"
        f"for m in {PURE_MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p', 'socket', 'asyncio'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"pure modules imported: {out}"
