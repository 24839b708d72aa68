"""pytest fixture: a real provider simulator on loopback, for the whole test session.

Registered for the whole suite by `pytest_plugins = ["providers.testing"]` in the root
conftest, which also defines `use_simulator` (settings pointed at it, prices loaded). Read
`simulator.requests` to see what the adapters sent (bodies and headers).
"""

from __future__ import annotations

import pytest

from providers.simulator import ProviderSimulator

# Fast enough that no test waits on streaming, slow enough that a stream is still a stream.
TEST_TOKENS_PER_SECOND = 0  # 0 = as fast as the socket takes it


@pytest.fixture(scope="session")
def simulator():
    """A simulator on a free loopback port, in a background thread, for the whole test session."""
    sim = ProviderSimulator("127.0.0.1", 0, tokens_per_second=TEST_TOKENS_PER_SECOND).start_in_thread()
    try:
        yield sim
    finally:
        sim.stop_thread()
