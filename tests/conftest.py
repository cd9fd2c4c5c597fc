"""Shared fixtures (models built once per test session) and the test tiers.

``pytest -m "not slow"`` is the fast tier: the pure cores and in-memory
adapters, in well under a minute. Whole modules whose tests start real nodes,
processes, a chain, real models or a package build are slow; a test elsewhere
opts in with ``@pytest.mark.slow``. ``make test`` (and CI) runs both tiers.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import pytest

from cocoon_p2p.execution.models import ModelSpec, load_model
from cocoon_p2p.testing.tinymodel import build_tiny_model

pytest_plugins = ["tests.netlab_fixtures"]

# Node programs started by tests (and their children) listen on loopback at any port,
# not at the workers' default 0.0.0.0:4001: many run at once on one machine. Tests
# that mean an address pass --listen (the NAT lab does).
os.environ.setdefault("COCOON_LISTEN", "/ip4/127.0.0.1/tcp/0")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny.onnx")
    return load_model(path, name="tiny", max_batch=8)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """The tiny model with a wide hidden layer: long enough jobs to cancel or kill."""
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "slow.onnx", hidden=2048)
    return load_model(path, name="slow", max_batch=1)


SLOW_MODULES = frozenset(
    {
        "test_attestation_e2e",
        "test_chain",
        "test_cli",
        "test_contract",
        "test_gateway",
        "test_interop",
        "test_jobs",
        "test_node",
        "test_packaging",
        "test_payments",
        "test_real_models",
        "test_settlement_chain",
        "test_simulations",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Trio nests failures in many exception groups (deeper than Python prints):
    show the innermost exceptions' tracebacks with the report."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and isinstance(call.excinfo.value, BaseExceptionGroup):
        text = "\n".join("".join(traceback.format_exception(leaf)) for leaf in _leaves(call.excinfo.value))
        report.sections.append(("innermost exceptions", text))
