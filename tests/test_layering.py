"""The architecture, checked: layers import only downward, and protocol logic is sans-IO.

Each module's layer comes from its subpackage (the table below), not from a
hand-kept list of modules: a new module is checked the day it is added. Two
packages of the same rank (overlay and execution; jobs, payments and attestation) must not
import each other: they meet through what a higher layer passes them.

Sans-IO: every module imports no I/O library (trio, libp2p, sockets...),
directly or through the package, unless it is one of the declared adapters,
the thin trio services that carry the pure machines' decisions out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Subpackage (or top-level module) -> rank. A module may import its own
# subpackage and any of strictly lower rank.
RANKS = {
    "_version": 0,
    "core": 0,
    "transport": 1,
    "overlay": 2,
    "execution": 2,
    "jobs": 3,
    "payments": 3,
    "attestation": 3,
    "node": 4,
    "api": 5,
    "testing": 6,
    "nodes": 7,
    "simulations": 7,
}
FACADE = "__init__"  # cocoon_p2p/__init__.py re-exports from every layer

IO_LIBRARIES = frozenset({"trio", "libp2p", "socket", "asyncio", "selectors", "urllib", "http", "subprocess"})
# The trio adapters (and programs). Everything else in cocoon_p2p must be pure.
ADAPTERS = {
    "transport": {
        "host",
        "noise",
        "muxer",
        "muxed_stream",
        "sealed",
        "fastlock",
        "relay",
        "autonat",
        "nat",
        "dcutr_upgrade",
        "redial",
    },
    "overlay": {"dht", "events", "guard", "gossip", "dialer", "advertiser", "lan"},
    "jobs": {
        "client",
        "client_link",
        "links",
        "worker",
        "worker_link",
        "serving",
        "stream",
        "checks",
        "fraudwatch",
        "paying",
    },
    "payments": {
        "chain",
        "toncenter",
        "wallet",
        "deposits",
        "payerchannel",
        "channelops",
        "payer",
        "payee",
        "service",
        "contract",
    },  # contract: npm
    # pccs: dcap-qvl's asyncio fetcher; sources: configfs and dstack's agent; gpu: NVML.
    "attestation": {"gate", "keeper", "pccs", "sources", "gpu"},
    "execution": {"engine_http"},  # the engine's HTTP client (http.client, socket)
    "core": set(),
}
WHOLE_PACKAGE_ADAPTERS = {"node", "api", "testing", "nodes", "simulations"}


def _modules(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted name under ``package`` -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _imports(module: str, path: Path, package: str) -> list[tuple[str, int]]:
    """Every ``package.*`` module that ``module`` imports (at any depth, type-only ones too)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == package:  # from . import a, b: modules a, b
                found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return [(t, line) for t, line in found if t == package or t.startswith(package + ".")]


def _external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _layer(module: str, package: str) -> str:
    rest = module[len(package) + 1 :] if module != package else FACADE
    return rest.split(".")[0]


def layer_violations(package_dir: Path, package: str, ranks: dict[str, int]) -> list[str]:
    """Upward or sideways imports in ``package``, as ``file:line: a -> b`` lines."""
    bad = []
    for module, path in _modules(package_dir, package).items():
        src = _layer(module, package)
        if src == FACADE:
            continue
        if src not in ranks:
            bad.append(f"{path}: {module} is in no layer (add its subpackage to the table)")
            continue
        for target, line in _imports(module, path, package):
            dst = _layer(target, package)
            if dst == FACADE:
                bad.append(f"{path}:{line}: {module} -> {target} (import from the layer itself, not the facade)")
            elif dst != src and ranks.get(dst, 99) >= ranks[src]:
                bad.append(f"{path}:{line}: {module} ({src}) -> {target} ({dst})")
    return bad


def _is_adapter(module: str, package: str) -> bool:
    layer = _layer(module, package)
    if layer in WHOLE_PACKAGE_ADAPTERS:
        return True
    leaf = module.split(".")[2] if module.count(".") >= 2 else ""
    return leaf in ADAPTERS.get(layer, set())


def purity_violations(package_dir: Path, package: str) -> list[str]:
    """Pure modules that import an I/O library, or an adapter of the package."""
    modules = _modules(package_dir, package)
    bad = []
    for module, path in modules.items():
        if _layer(module, package) == FACADE or _is_adapter(module, package):
            continue
        io = _external_imports(path) & IO_LIBRARIES
        if io:
            bad.append(f"{path}: {module} is sans-IO but imports {sorted(io)}")
        if path.name == "__init__.py":
            continue  # a subpackage's facade names its services lazily (they load on first use)
        for target, line in _imports(module, path, package):
            if target in modules and _is_adapter(target, package) and _layer(target, package) != FACADE:
                bad.append(f"{path}:{line}: {module} is sans-IO but imports the adapter {target}")
    return bad


def test_programs_use_the_library_not_each_other() -> None:
    """nodes/ and simulations/ (cocoon_p2p.nodes, cocoon_p2p.simulations once installed) share only the library."""
    pairs = [("nodes", ("simulations", "cocoon_p2p.simulations")), ("simulations", ("nodes", "cocoon_p2p.nodes"))]
    bad = []
    for name, others in pairs:
        for module, path in _modules(ROOT / name, name).items():
            for other in others:
                bad += [f"{path}:{line}: {module} -> {t}" for t, line in _imports(module, path, other)]
    assert bad == []


def test_layers_import_only_downward() -> None:
    assert layer_violations(ROOT / "cocoon_p2p", "cocoon_p2p", RANKS) == []


def test_protocol_logic_is_sans_io() -> None:
    assert purity_violations(ROOT / "cocoon_p2p", "cocoon_p2p") == []


def test_pure_modules_load_without_io_libraries() -> None:
    """The same property, observed: import every pure module in a fresh interpreter."""
    pure = [
        m
        for m in _modules(ROOT / "cocoon_p2p", "cocoon_p2p")
        if not _is_adapter(m, "cocoon_p2p") and m not in ("cocoon_p2p.execution.export",)
    ]
    code = (
        "import sys\n"
        f"for m in {pure!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p', 'socket', 'asyncio'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"pure modules imported: {out}"


def _fake_package(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp / "pkg"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from pkg.jobs import client\n", "pkg.transport.noise (transport) -> pkg.jobs (jobs)"),
        ("from ..jobs.client import JobClient\n", "pkg.transport.noise (transport) -> pkg.jobs.client (jobs)"),
        ("def f():\n    from pkg.node import Node\n", "pkg.transport.noise (transport) -> pkg.node (node)"),
        ("from pkg import node\n", "pkg.transport.noise (transport) -> pkg.node (node)"),
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, source: str, expected: str) -> None:
    pkg = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "node.py": "",
            "transport/__init__.py": "",
            "transport/noise.py": source,
            "jobs/__init__.py": "",
            "jobs/client.py": "from pkg.transport import noise\n",  # downward: fine
        },
    )
    found = layer_violations(pkg, "pkg", RANKS)
    assert len(found) == 1 and found[0].endswith(expected), found


def test_a_sideways_import_between_peers_is_caught(tmp_path: Path) -> None:
    pkg = _fake_package(
        tmp_path,
        {"__init__.py": "", "jobs/__init__.py": "", "jobs/client.py": "from pkg.payments.payer import Payer\n",
         "payments/__init__.py": "", "payments/payer.py": ""},
    )  # fmt: skip
    assert [v.split(": ", 1)[1] for v in layer_violations(pkg, "pkg", RANKS)] == [
        "pkg.jobs.client (jobs) -> pkg.payments.payer (payments)"
    ]


def test_a_pure_module_importing_trio_is_caught(tmp_path: Path) -> None:
    pkg = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "jobs/__init__.py": "",
            "jobs/frames.py": "import trio\n",
            "jobs/client.py": "import trio\n",
        },
    )
    found = purity_violations(pkg, "pkg")
    assert len(found) == 1 and "pkg.jobs.frames is sans-IO but imports ['trio']" in found[0]
