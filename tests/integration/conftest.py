"""Hooks against the real lab, built the way plugins/barman_dr/operators/base.py builds them."""

from __future__ import annotations

import os
import time
import uuid

import pytest


@pytest.fixture(scope="session")
def lab_dir() -> str:
    return os.environ["LAB_DIR"]


@pytest.fixture(scope="session")
def server_name() -> str:
    return os.environ.get("LAB_BARMAN_SERVER", "pg-primary")


@pytest.fixture(scope="session")
def srv(inventory, server_name):
    return inventory.server(server_name)


@pytest.fixture(scope="session")
def barman(inventory, srv):
    from barman_dr.hooks.barman import BarmanHook

    bh = inventory.barman_host_of(srv)
    hook = BarmanHook(ssh_conn_id=bh.ssh_conn_id, barman_command=bh.barman_command, job_dir=bh.job_dir)
    yield hook
    hook.close()


@pytest.fixture(scope="session")
def standby(srv):
    return srv.standbys[0]


@pytest.fixture(scope="session")
def standby_host(inventory, standby):
    from barman_dr.hooks.dbhost import DbHostHook

    hook = DbHostHook(db_host=inventory.db_host(standby.host))
    yield hook
    hook.close()


@pytest.fixture
def unique() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def primary_write(delay: float = 0.5) -> None:
    """A tiny write on the primary: `switch-wal --archive` and `backup --wait` wait for the next WAL record."""
    import psycopg2

    time.sleep(delay)
    conn = psycopg2.connect(os.environ["LAB_PRIMARY_DSN"], connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
    finally:
        conn.close()


@pytest.fixture(scope="session")
def write_soon():
    """Start a tiny write on the primary in the background; returns the thread (join it)."""
    import threading

    def start(delay: float = 0.5) -> threading.Thread:
        t = threading.Thread(target=primary_write, args=(delay,), daemon=True)
        t.start()
        return t

    return start
