"""Fixtures shared by the e2e modules that leave the lab's topology changed (a PITR onto a standby)."""

from __future__ import annotations

import pytest

from tests.pitr_support import failback


@pytest.fixture
def lab_topology_restored():
    """Whatever the run did, the next suites find pg-primary serving (the recovered data) and the standbys following."""
    yield
    failback()
