"""The NAT lab for tests (a pytest plugin, registered in ``conftest.py``).

:func:`netlab` holds what every lab test starts with: skip, with the reason, where a lab
cannot be built here (not root, no ``ip``/``iptables``, no namespaces), else hand out
:class:`~cocoon_p2p.testing.netlab.Lab` to build one with. The tests choose each lab's
lifetime (``with netlab() as lab`` in a fixture of their scope): one per test where tests
reuse machine names, one per module where a module shares a network.
"""

from __future__ import annotations

import pytest

from cocoon_p2p.testing.netlab import Lab, unavailable_reason


@pytest.fixture(scope="session")
def netlab() -> type[Lab]:
    """:class:`Lab`, once this machine is known to build labs (else the test is skipped)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return Lab
