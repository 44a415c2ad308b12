"""Unit tests of broker.journal: hashed rows, failed writes, retried removals, tombstones, unreadable journals."""
from __future__ import annotations

import os
import sqlite3

import pytest

from broker import state as st
from broker.journal import Journal, JournalError
from neuron_client.wire import lease_link


def lease(lease_id="a" * 16, cores=(0,)):
    return st.Lease(lease_id=lease_id, token_hash=st.token_hash("secret-token"), pid=os.getpid(), uid=os.getuid(),
                    start_time=1.0, cmd="app", cores=list(cores), granted_at=0.0)


def test_rows_round_trip_without_the_token(tmp_path):
    j = Journal(str(tmp_path / "leases.db"))
    j.record(lease())
    (row,) = j.load()
    assert row["token_hash"] == st.token_hash("secret-token") and row["cores"] == [0] and row["uid"] == os.getuid()
    j.close()
    assert b"secret-token" not in open(tmp_path / "leases.db", "rb").read()


def test_a_locked_journal_fails_the_write_quickly_and_retries_removals(tmp_path):
    path = str(tmp_path / "leases.db")
    j = Journal(path)
    j.record(lease())
    other = sqlite3.connect(path, isolation_level=None, timeout=1)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(JournalError, match="locked"):
        j.record(lease("b" * 16))
    j.forget("a" * 16)
    assert j.unforgotten == {"a" * 16}
    other.execute("ROLLBACK")
    other.close()
    j.retry()
    assert j.unforgotten == set() and j.load() == []


def test_tombstoned_leases_are_not_restored(tmp_path):
    j = Journal(str(tmp_path / "leases.db"))
    j.record(lease())
    j.record(lease("b" * 16, cores=(1,)))
    assert lease_link.write_tombstone(str(tmp_path), "a" * 16)
    assert not lease_link.write_tombstone(str(tmp_path), "../../etc")
    assert [r["lease_id"] for r in j.load()] == ["b" * 16]
    assert os.listdir(lease_link.tombstone_dir(str(tmp_path))) == []


@pytest.mark.parametrize("content", [b"SQLite format 3\x00" + b"\x17" * 4000, b"garbage" * 100])
def test_an_unreadable_journal_is_set_aside(tmp_path, content):
    path = tmp_path / "leases.db"
    path.write_bytes(content)
    j = Journal(str(path))
    assert j.recovering and j.load() == []
    assert any(p.name.startswith("leases.db.unreadable-") for p in tmp_path.iterdir())
    j.record(lease())  # and a fresh one works
    assert len(j.load()) == 1
