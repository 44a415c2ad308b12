"""A durable journal of leases (SQLite), so that a broker killed and started again hands no live owner's core to
another process.

Every grant is written before the client hears of it, every release or reclamation removes its row. A broker that
starts reads the journal: leases whose owner still runs (same pid, same start time) are restored and given a grace
period to heartbeat again; the others are dropped.
"""
from __future__ import annotations

import json
import os
import sqlite3

from .leases import Lease


class Journal:
    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # the tokens inside are secrets
        os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS leases (lease_id TEXT PRIMARY KEY, token TEXT, pid INTEGER, "
            "create_time REAL, cmd TEXT, cores TEXT, granted_wall REAL)")

    def record(self, lease: Lease) -> None:
        self.db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (lease.lease_id, lease.token, lease.pid, lease.create_time, lease.cmd,
                         json.dumps(lease.cores), lease.granted_wall))

    def forget(self, lease_id: str) -> None:
        self.db.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))

    def load(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT lease_id, token, pid, create_time, cmd, cores, granted_wall FROM leases").fetchall()
        out = []
        for lease_id, token, pid, create_time, cmd, cores, granted_wall in rows:
            try:
                out.append({"lease_id": lease_id, "token": token, "pid": int(pid), "create_time": float(create_time),
                            "cmd": cmd, "cores": [int(c) for c in json.loads(cores)], "granted_wall": granted_wall})
            except (TypeError, ValueError):
                self.forget(lease_id)
        return out

    def close(self) -> None:
        self.db.close()
