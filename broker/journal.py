"""A durable journal of leases (SQLite), so that a broker killed and started again hands no live owner's core to
another process.

Every grant is written before anything else changes for good (:class:`JournalError` if it cannot be: the grant is then
undone and refused); every end removes its row. Only a hash of each lease's token is kept: the journal holds nothing a
reader could use as a token. A broker that starts reads the journal; leases whose owner may still run wait for it to
re-attach (``broker.state``). A journal that cannot be read is set aside (renamed, never deleted) and the broker starts
with an empty one, in recovery (acquires wait out the grace period so that live owners re-attach first).

An owner that releases while the broker is down leaves a tombstone (``released/<lease id>``) so that the lease is not
brought back.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time

from neuron_client.wire.lease_link import tombstone_dir

log = logging.getLogger("neuron.broker")
BUSY_TIMEOUT_S = 0.25  # a journal locked by someone else fails the write quickly instead of stalling the loop


class JournalError(RuntimeError):
    pass


class Journal:
    def __init__(self, path: str):
        self.path = path
        self.directory = os.path.dirname(path)
        self.recovering = False  # the previous journal was lost or unreadable
        self.unforgotten: set[str] = set()  # rows whose removal failed, retried
        self.db = None
        try:
            self._open()
            self._check()
        except (sqlite3.DatabaseError, OSError) as exc:
            self._set_aside(exc)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS leases_v2 (lease_id TEXT PRIMARY KEY, token_hash TEXT, pid INTEGER, "
            "uid INTEGER, start_time REAL, cmd TEXT, cores TEXT, granted_wall REAL)")
        self.db.execute("DROP TABLE IF EXISTS leases")  # the first format kept tokens in plain text

    def _check(self) -> None:
        row = self.db.execute("PRAGMA quick_check").fetchone()
        if not row or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {row[0] if row else 'no answer'}")

    def _set_aside(self, exc: BaseException) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
        aside = f"{self.path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except OSError:
                pass
        log.error("the lease journal %s could not be read (%s); it was set aside as %s and the broker starts with an "
                  "empty one: owners still running get the grace period to re-attach before new grants", self.path,
                  exc, aside)
        self.recovering = True
        self.db = None
        try:
            self._open()
        except (sqlite3.Error, OSError) as exc2:
            log.error("cannot create a new journal at %s (%s): grants are refused until it can be written", self.path,
                      exc2)
            self.db = None

    def record(self, lease) -> None:
        """Write a grant; :class:`JournalError` saying why if it cannot be written."""
        if self.db is None:
            try:
                self._open()
            except (sqlite3.Error, OSError) as exc:
                raise JournalError(f"the journal {self.path} cannot be opened: {exc}") from None
        try:
            self.db.execute("INSERT OR REPLACE INTO leases_v2 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (lease.lease_id, lease.token_hash, lease.pid, lease.uid, lease.start_time,
                             lease.cmd, json.dumps(lease.cores), lease.granted_wall or time.time()))
        except (sqlite3.Error, OverflowError, OSError) as exc:
            raise JournalError(f"writing {self.path} failed: {exc}") from None

    def forget(self, lease_id: str) -> None:
        """Remove a lease's row; if that fails (a locked journal, a full disk) it is retried by :meth:`retry`."""
        if self.db is None:
            self.unforgotten.add(lease_id)
            return
        try:
            self.db.execute("DELETE FROM leases_v2 WHERE lease_id = ?", (lease_id,))
            self.unforgotten.discard(lease_id)
        except sqlite3.Error as exc:  # never fatal: a stale row loses to a newer one of its core at a restart
            if lease_id not in self.unforgotten:
                log.warning("could not remove lease %s from the journal (%s); retrying", lease_id, exc)
            self.unforgotten.add(lease_id)

    def retry(self) -> None:
        """Remove the rows whose removal failed before."""
        for lease_id in list(self.unforgotten):
            self.forget(lease_id)

    def load(self) -> list[dict]:
        """The journalled leases, less those released while the broker was down (their tombstones are removed)."""
        if self.db is None:
            return []
        try:
            rows = self.db.execute("SELECT lease_id, token_hash, pid, uid, start_time, cmd, cores, granted_wall "
                                   "FROM leases_v2").fetchall()
        except sqlite3.Error as exc:
            self._set_aside(exc)
            return []
        released = set()
        try:
            released = set(os.listdir(tombstone_dir(self.directory)))
        except OSError:
            pass
        out = []
        for lease_id, token_hash, pid, uid, start_time, cmd, cores, granted_wall in rows:
            if lease_id in released:
                self.forget(lease_id)
                continue
            try:
                out.append({"lease_id": str(lease_id), "token_hash": str(token_hash), "pid": int(pid),
                            "uid": int(uid), "start_time": float(start_time), "cmd": str(cmd),
                            "cores": [int(c) for c in json.loads(cores)], "granted_wall": granted_wall})
            except (TypeError, ValueError):
                self.forget(lease_id)
        for name in released:
            try:
                os.unlink(os.path.join(tombstone_dir(self.directory), name))
            except OSError:
                pass
        return out

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
