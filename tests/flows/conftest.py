import pytest
from prefect.events.worker import EventsWorker
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(autouse=True, scope="session")
def prefect_server():
    """One temporary Prefect server and database for every flow test in the session.

    Prefect keeps one events worker per process, keyed by its client type and not by the
    server: one that an earlier test started against a server of its own (now gone) would
    carry this session's events (task-run states, darkroom's events) there. Those go first.
    """
    EventsWorker.drain_all(timeout=10)
    with prefect_test_harness(server_startup_timeout=120):
        yield
