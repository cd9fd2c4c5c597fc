"""The protocol logic is sans-IO: importing it must not pull in trio or libp2p,
so the simulator can run it unchanged in virtual time."""

import subprocess
import sys

PURE_MODULES = [
    "cocoon_p2p",
    "cocoon_p2p.core.errors",
    "cocoon_p2p.core.wire",
    "cocoon_p2p.core.identity",
    "cocoon_p2p.core.signed",
    "cocoon_p2p.overlay.capability",
    "cocoon_p2p.overlay.announcement",
    "cocoon_p2p.overlay.directory",
    "cocoon_p2p.overlay.peerscore",
    "cocoon_p2p.overlay.peerset",
    "cocoon_p2p.overlay.protocols",
    "cocoon_p2p.execution.tensors",
    "cocoon_p2p.jobs.frames",
    "cocoon_p2p.jobs.connection",
    "cocoon_p2p.jobs.batching",
    "cocoon_p2p.jobs.routing",
    "cocoon_p2p.execution.models",
    "cocoon_p2p.payments.vouchers",
    "cocoon_p2p.payments.messages",
    "cocoon_p2p.payments.frames",
    "cocoon_p2p.payments.settlement",
    "cocoon_p2p.core.metrics",
    "cocoon_p2p.api.openai",
    "cocoon_p2p.transport.yamux",
    "cocoon_p2p.transport.reassembly",
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
