"""The net tier: real namespaces, so root and a working ``ip netns`` are required.

Everything under tests/net is marked ``net``.  Without root or namespaces the whole tier is
skipped with the reason.  The ``testbed`` fixture yields a fresh ``Testbed`` and always closes
it; at session end no namespace of this process may remain.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ipop.testbed.netns import Testbed, check_environment, list_namespaces, run_stem, sweep_stale

_HERE = Path(__file__).parent
_REASON: str | None = None
_CHECKED = False


def _environment_problem() -> str | None:
    global _REASON, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        _REASON = check_environment()
    return _REASON


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.net)
            reason = _environment_problem()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"net tier skipped: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left_behind() -> Iterator[None]:
    if _environment_problem() is not None:
        yield
        return
    sweep_stale()  # namespaces of earlier crashed runs (their pid is gone)
    yield
    left = [ns for ns in list_namespaces() if ns.startswith(run_stem())]
    assert not left, f"namespaces left behind by this run: {left}"


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    tb = Testbed()
    try:
        yield tb
    finally:
        tb.close()
