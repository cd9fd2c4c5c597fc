"""What ``pip install cocoon-p2p`` gives a user: the wheel, built and installed into a fresh venv.

The fresh venv gets the wheel alone (``--no-deps``); its third-party
dependencies come from this test run's own environment through a ``.pth``
file, so the test needs no network and cannot see the source checkout: it runs
in a temporary folder, and the development install's editable hook is not
loaded there.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import cocoon_p2p

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources, so that the build's own folders (build/, *.egg-info) stay out of the checkout.
    src = tmp_path_factory.mktemp("src") / "cocoon-p2p"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "node_modules", "build", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("cocoon_p2p-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # This run's pip, installing into the fresh venv (which has no pip of its own).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    Path(purelib, "deps-from-test-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_holds_the_package_and_its_data_under_one_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("cocoon_p2p-")}
    assert top == {"cocoon_p2p"}  # no generic top-level names such as "nodes" or "simulations"
    for needed in (
        "cocoon_p2p/py.typed",
        "cocoon_p2p/testing/localchain/server.mjs",
        "cocoon_p2p/testing/localchain/package-lock.json",
        "cocoon_p2p/nodes/example-worker.toml",
        "cocoon_p2p/simulations/scenarios/small.toml",
    ):
        assert needed in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert f"Version: {cocoon_p2p.__version__}" in meta
    assert "Requires-Dist: cryptography" in meta
    assert "Requires-Dist: h11>=0.16" in meta
    for extra in ("sim", "export", "gpu", "testing"):
        assert f"Provides-Extra: {extra}" in meta


def test_the_installed_programs_and_library_work(fresh_venv: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv / "bin"
    version = _run(fresh_venv, str(bin_dir / "cocoon-node"), "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"cocoon-node {cocoon_p2p.__version__}"
    sim_version = _run(fresh_venv, str(bin_dir / "cocoon-sim"), "--version", cwd=tmp_path)
    assert sim_version.stdout.strip() == f"cocoon-sim {cocoon_p2p.__version__}", sim_version.stderr

    keygen = _run(fresh_venv, str(bin_dir / "cocoon-node"), "keygen", "--data-dir", str(tmp_path / "k"), cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    assert keygen.stdout.strip().startswith("12D3KooW")
    assert (tmp_path / "k" / "node.key").stat().st_mode & 0o077 == 0

    code = (
        "import cocoon_p2p, cocoon_p2p.transport, cocoon_p2p.overlay, cocoon_p2p.jobs, cocoon_p2p.payments, "
        "cocoon_p2p.api\n"
        "from cocoon_p2p import Node, NodeConfig\n"
        "from cocoon_p2p.testing.localchain import SOURCE_DIR\n"
        "assert 'site-packages' in cocoon_p2p.__file__, cocoon_p2p.__file__\n"
        "assert (SOURCE_DIR / 'server.mjs').is_file()\n"
        "print(cocoon_p2p.__version__)\n"
    )
    lib = _run(fresh_venv, str(bin_dir / "python"), "-c", code, cwd=tmp_path)
    assert lib.returncode == 0, lib.stderr
    assert lib.stdout.strip() == cocoon_p2p.__version__


def test_cocoon_sim_without_the_sim_extra_names_the_extra(fresh_venv: Path, tmp_path: Path) -> None:
    # Hide matplotlib and scipy, as an install without [sim] would lack them.
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None; sys.modules['scipy'] = None\n"
        "sys.argv = ['cocoon-sim', 'run', 'x.toml']\n"
        "from cocoon_p2p.simulations.cli import main\n"
        "sys.exit(main())\n"
    )
    out = _run(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "pip install 'cocoon-p2p[sim]'" in out.stderr
    assert "Traceback" not in out.stderr
