"""Stress, fault and fuzz mix at the broker's default settings: the proof that a core has one owner at a time.

    bash scripts/chaos [--seconds 60] [--clients 32] [--cores 8] [--quick]

The broker runs with its defaults: no lease timeout, no heartbeats, the default restart limits. For ``--seconds``:

* **clients** (``--clients`` processes, forked from a forkserver that has imported torch, so that replacing a killed
  one costs a fork, not an import) loop: acquire cores (``NEURON_RT_NUM_CORES`` or ``NEURON_RT_VISIBLE_CORES``,
  sometimes with ``NEURON_RT_ACQUIRE_TIMEOUT``), load one or two models (one large enough to travel through shared
  memory), call them and check every result, release. Some spin in pure Python holding the GIL for 0.1-1 s between
  calls, some make lots of cyclic garbage and call ``gc.collect()``; a few write their lease's token to a file on
  purpose (the fuzzer's stolen tokens). Each client logs, per core, the interval during which it believed it owned
  the core (from its grant to the start of its release, or to the moment it learnt of a loss) and the interval of
  every call, on CLOCK_MONOTONIC (``time.monotonic()``, one clock for every process on Linux).
* **CPU pressure**: busy-loop processes besides the clients' GIL spins.
* **faults**: ``kill -9`` of random clients (owners first; each is replaced, and the time until status shows its
  cores free is measured), of random workers, and of the broker itself a few times (started again at once in the
  same directory with the same arguments; the last time with its journal corrupted while it is down, which it must set
  aside; ``--journal-fault truncate`` cuts it to 0 bytes instead);
  SIGSTOP/SIGCONT of a client for 1-3 s (it must keep its cores); an exclusive SQLite lock on the journal for 1 s
  (grants fail with a clear error, which clients take as a refusal).
* **fuzzing**: two fuzzer processes send batches of bad requests, pipelined (100 at a time on each of two sockets
  per target), to the broker's ZeroMQ socket, its lease socket (raw bytes, random frames, valid frames with wrong
  types or values, re-attaches and releases with stolen lease ids and tokens) and every worker's socket (random bytes;
  ``call``/``load``/``unload`` with empty, random and stolen tokens; arguments and reply segments in other processes'
  ``nrt-*`` segments). Every request must get an error reply (a release of another's lease: Ok, with no effect);
  a stolen token that passes the token check on a core its lease does not hold, a stolen lease re-attached, a foreign
  segment accepted, or any other non-error reply is a violation. Replies, errors and timeouts are counted per socket.

Afterwards the checker merges every client's intervals per core: two processes' intervals overlapping on one core is
a violation, and so is a live owner that lost its cores without a broker restart, a wrong result, or a dead owner's
core still owned 2 s after its death. No core may stay owned, no ``nrt-*`` segment of a run process may remain, no
process of the run may outlive it. Exit status 1 on any violation or leak.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL_SHAPE = [2, 8]
BIG_SHAPE = [64, 1024]  # 256 KiB of float32: requests and replies travel through shared memory
DEAD_OWNER_LIMIT_S = 2.0  # a dead owner's cores must be free this soon (the broker frees them at once)
FUZZERS = 2  # fuzzer processes
FUZZ_OVERTIME_S = 30.0  # a fuzzer short of its cases when the chaos phase ends goes on (clients draining) this long
BATCH = 100  # fuzz requests sent back to back on one socket before their replies are collected
FUZZ_REPLY_TIMEOUT_S = 4.0  # a batch's missing replies are sent once more (on a fresh socket) after this long
RESTART_MARGIN_S = 6.0  # after a restarted broker's grace period, errors are still put down to the restart


def now() -> float:
    return time.monotonic()


# -- the client process ----------------------------------------------------------------------------------------------

def client_main(cfg: dict) -> None:
    """One client: acquire / load / call / release until ``cfg['until']``, logging what it believed it owned."""
    os.environ.update(NEURON_BROKER_DIR=cfg["directory"], NEURON_BROKER_AUTOSTART="0")
    for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_RT_ACQUIRE_TIMEOUT",
                "NEURON_BROKER_ADDRESS"):
        os.environ.pop(var, None)
    pid = os.getpid()
    obs = os.path.join(cfg["work"], "obs")
    err = os.open(os.path.join(obs, f"{pid}.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(err, 2)  # the runtime's log lines (re-attaching, ...) and a traceback on SIGUSR1
    import faulthandler

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    fd = os.open(os.path.join(obs, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def log(*parts) -> None:  # one write per line: a kill -9 never leaves half a line
        os.write(fd, (" ".join(str(p) for p in parts) + "\n").encode())

    import gc
    import warnings

    import torch

    import neuron_client
    from neuron_client.runtime import lease as runtime_mod
    from neuron_client.runtime.lease import Runtime
    from neuron_client.wire.errors import LeaseLostError, NeuronCoreUnavailableError, NeuronRuntimeError, NotOwnerError

    torch.set_num_threads(1)
    warnings.simplefilter("always", RuntimeWarning)
    warnings.showwarning = lambda message, category, *a, **k: log(
        "W", now(), category.__name__, " ".join(str(message).split())[:300])
    rng = random.Random(cfg["seed"])
    n_cores = cfg["cores"]
    spinner, collector, token_writer = cfg["spinner"], cfg["collector"], cfg["token_writer"]
    if collector:
        gc.set_threshold(200, 5, 5)
    tokens = os.path.join(cfg["work"], "tokens")

    def pressure() -> None:
        if spinner and rng.random() < 0.35:  # pure Python, holding the GIL: the lease thread cannot run
            end = now() + rng.uniform(0.1, 1.0)
            old = sys.getswitchinterval()
            sys.setswitchinterval(5.0)
            try:
                n = 0
                while now() < end:
                    n += 1
            finally:
                sys.setswitchinterval(old)
        if collector and rng.random() < 0.5:  # cyclic garbage, then a full collection
            junk = []
            for i in range(rng.randint(2000, 20000)):
                a = {"i": i}
                a["self"] = [a, i]  # a cycle: only the collector frees it
                junk.append(a)
            del junk
            if rng.random() < 0.5:
                gc.collect()

    def write_token(rt, models) -> None:
        doc = {"pid": pid, "lease_id": rt.lease_id, "token": rt.token, "cores": list(rt.cores),
               "models": [[r.core, r.model_id, shape] for m, shape in models for r in m.replicas], "t": now()}
        tmp = os.path.join(tokens, f".{pid}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, os.path.join(tokens, f"{pid}.json"))

    def use(rt) -> None:
        models = [(neuron_client.jit.load(cfg["small"]), SMALL_SHAPE)]
        if rng.random() < 0.3:
            models.append((neuron_client.jit.load(cfg["big"]), BIG_SHAPE))
        if token_writer:
            write_token(rt, models)
        failures = 0
        # some leases are held for a while (so that broker restarts find owners to re-attach), most are short
        hold_until = now() + (rng.uniform(4.0, 12.0) if rng.random() < 0.15 else 0.0)
        n_calls = rng.randint(1, 6)
        done = 0
        while done < n_calls or now() < hold_until:
            done += 1
            pressure()
            m, shape = rng.choice(models)
            x = torch.rand(*shape)
            t0 = now()
            try:
                y = m(x)
            except (LeaseLostError, NotOwnerError):
                raise
            except NeuronRuntimeError as exc:  # a worker killed, the broker restarted: the next call recovers
                log("X", now(), "use", type(exc).__name__, 0, " ".join(str(exc).split())[:300])
                failures += 1
                if failures > 3 and now() >= hold_until:
                    return
                time.sleep(0.2)
                continue
            t1 = now()
            ok = bool(torch.allclose(y, x * 3 - 1))
            log("C", m.last_core, t0, t1, int(ok))
            if now() < hold_until:
                time.sleep(rng.uniform(0.05, 0.3))
        if rng.random() < 0.5:
            for m, _ in models:
                m.unload()
        models.clear()  # the others are unloaded by their finalizers (the runtime's janitor)

    until = cfg["until"]
    while now() < until:
        env = {}
        if rng.random() < 0.5:
            env["NEURON_RT_NUM_CORES"] = str(rng.choice([1, 1, 1, 2]))
        else:
            first = rng.randrange(n_cores)
            env["NEURON_RT_VISIBLE_CORES"] = (f"{first}-{first + 1}" if first + 1 < n_cores and rng.random() < 0.2
                                              else str(first))
        if rng.random() < 0.3:
            env["NEURON_RT_ACQUIRE_TIMEOUT"] = "0.5"
        t0 = now()
        try:
            rt = Runtime(env=env)
        except NeuronCoreUnavailableError as exc:
            if str(exc).startswith("NeuronCore(s) not available"):
                log("X", now(), "acquire", "conflict", round(now() - t0, 3))
            else:  # e.g. a grant abandoned
                log("X", now(), "acquire", "unavailable", round(now() - t0, 3), " ".join(str(exc).split())[:300])
            time.sleep(rng.uniform(0.1, 0.5))
            continue
        except NeuronRuntimeError as exc:
            kind = "journal" if "journal" in str(exc) else type(exc).__name__
            log("X", now(), "acquire", kind, round(now() - t0, 3), " ".join(str(exc).split())[:300])
            time.sleep(rng.uniform(0.2, 0.5))
            continue
        log("B", rt.lease_id, ",".join(map(str, rt.cores)), now())
        runtime_mod._runtime = rt  # the models below use this lease
        lost = None
        try:
            use(rt)
        except (LeaseLostError, NotOwnerError) as exc:
            lost = exc
        except NeuronRuntimeError as exc:
            log("X", now(), "use", type(exc).__name__, 0, " ".join(str(exc).split())[:300])
        finally:
            t_end = now()
            if lost is None and rt.lost:
                lost = LeaseLostError(rt.lost)
            log("E", rt.lease_id, t_end)  # the start of the release, or the moment it learnt of the loss
            if lost is not None:
                log("L", t_end, type(lost).__name__, " ".join(str(lost).split())[:300])
            rt.close()
            runtime_mod._runtime = None
        time.sleep(rng.uniform(0.0, 0.2))
    log("Q", now())


# -- the fuzzer process ----------------------------------------------------------------------------------------------

def fuzzer_main(cfg: dict) -> None:
    """Bad requests in pipelined batches to the sockets ``cfg['targets']`` names (the lease socket, the broker's,
    workers' ``core-N``) until ``cfg['until']``; results to ``fuzz-<cfg['index']>.json``."""
    import secrets
    import socket

    import msgpack
    import zmq

    from neuron_client.wire import codec, comm as transport, messages

    directory, work, n_cores = cfg["directory"], cfg["work"], cfg["cores"]
    rng = random.Random(cfg["seed"])
    V = messages.PROTOCOL_VERSION
    ext = msgpack.ExtType
    lease_path = os.path.join(directory, "lease.sock")
    down_marker = os.path.join(work, "broker-down")
    epoch_file = os.path.join(work, "epoch")
    counts: dict[str, int] = {}
    codes: dict[str, int] = {}
    violations: list[str] = []
    held_refusals: list = []  # (lease id, core, sent, answered): a stolen token refused on its own lease's core
    ids = iter(range(1, 1 << 62))

    def count(key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    groups: dict[str, dict[str, int]] = {}  # per socket kind: cases, replies, errors, not owner, timeouts

    def tally(target: str, what: str, n: int = 1) -> None:
        g = ("broker socket (ZeroMQ)" if target == "broker" else "lease socket (AF_UNIX)" if target == "lease"
             else "worker sockets (ZeroMQ)")
        row = groups.setdefault(g, {})
        row[what] = row.get(what, 0) + n

    def violation(text: str) -> None:
        count("violations")
        if len(violations) < 50:
            violations.append(text)

    def epoch() -> str:
        try:
            with open(epoch_file) as f:
                return f.read()
        except OSError:
            return ""

    def head(op, body, rid, v=V) -> bytes:
        return msgpack.packb({"v": v, "op": op, "id": rid, "body": body})

    def tref(index, dtype, shape):
        return ext(codec.EXT_TENSOR, msgpack.packb([index, dtype, shape]))

    def sref(name, offset, dtype, shape):
        return ext(codec.EXT_SHM_TENSOR, msgpack.packb([name, offset, dtype, shape]))

    def tup(items):
        return ext(codec.EXT_TUPLE, msgpack.packb(items))

    def randbytes(lo, hi) -> bytes:
        b = bytearray(rng.randbytes(rng.randint(lo, hi)))
        if b and (0x80 <= b[0] <= 0x8f or b[0] in (0xde, 0xdf)):  # never a map: its reply carries request id 0
            b[0] = 0xc1
        return bytes(b)

    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        return bytes(b)

    small = os.urandom(4 * 2 * 8)
    big = os.urandom(4 * 64 * 1024)
    stolen: list[dict] = []
    segments: list[tuple[int, str]] = []
    last_scan = [0.0]

    def scan() -> None:
        if now() - last_scan[0] < 0.5:
            return
        last_scan[0] = now()
        docs = []
        for path in glob.glob(os.path.join(work, "tokens", "*.json")):
            try:
                with open(path) as f:
                    docs.append(json.load(f))
            except (OSError, ValueError):
                pass
        stolen[:] = docs
        segs = []
        for path in glob.glob("/dev/shm/nrt-*"):
            name = os.path.basename(path)
            try:
                segs.append((int(name.split("-")[1]), name))
            except (IndexError, ValueError):
                pass
        segments[:] = segs

    def foreign_segment(not_pid: int) -> str:
        others = [name for p, name in segments if p != not_pid]
        if others:
            return rng.choice(others)
        return f"nrt-{rng.randint(2, 4_000_000)}-{secrets.token_hex(8)}-0"

    # A case: (kind, frames, expected reply id, detail). Kinds: "err" (any error reply), "notowner" (exactly
    # NOT_OWNER: a well-formed request whose only fault is its token), "held" (a stolen token on a core its lease
    # holds: any error; a result is a foreign reply segment accepted), "segarg" (arguments in a foreign segment: any
    # error), "reattach" (a stolen lease re-attached is a violation), "release" (Ok, no effect).
    def case(kind, frames, detail=None):
        label = {"held": "stolen token, on a core its lease holds", "segarg": "arguments in a foreign segment",
                 "reattach": "stolen lease id and token, re-attach", "release": "stolen lease id, release"}.get(kind)
        if kind == "notowner":
            label = ("stolen token, on a core its lease does not hold" if str(detail).startswith("stolen")
                     else f"{detail}")
        if label:
            count(f"sent: {label}")
        return (kind, frames, codec.peek_req_id([frames[0]]) if frames and frames[0] else 0, detail)

    def worker_request(core: int, token, rid: int):
        op = rng.choice(("call", "call", "load", "unload"))
        if op == "call":
            body = {"token": token, "model_id": rng.randint(1, 50), "args": tup([tref(1, "float32", SMALL_SHAPE)])}
            if rng.random() < 0.3:
                body["reply_shm"] = foreign_segment(0)
            return [head("call", body, rid), small]
        if op == "load":
            return [head("load", {"token": token, "name": "fuzz", "data": tref(1, "uint8", [256])}, rid),
                    os.urandom(256)]
        return [head("unload", {"token": token, "model_id": rng.randint(1, 50)}, rid)]

    def worker_case(core: int):
        r = rng.random()
        rid = next(ids)
        if r < 0.12:
            return case("err", [randbytes(0, 300) for _ in range(rng.randint(1, 3))])
        if r < 0.20:
            req = worker_request(core, "", rid)
            return case("err", [mutate(req[0])] + req[1:])
        if r < 0.27:  # wrong field types
            bad = rng.choice([{"token": 5, "model_id": 1}, {"token": "", "model_id": "1"}, {"token": None},
                              {"model_id": 1}, {"token": "", "model_id": 1, "extra": 1}])
            return case("err", [head(rng.choice(("call", "unload", "load")), bad, rid)])
        if r < 0.40:
            return case("notowner", worker_request(core, "", rid), "empty token")
        if r < 0.55:
            return case("notowner", worker_request(core, secrets.token_urlsafe(32), rid), "random token")
        if r < 0.65:  # arguments in a segment of someone else
            name = foreign_segment(0)
            body = {"token": rng.choice(("", secrets.token_urlsafe(32))), "model_id": 1,
                    "args": tup([sref(name, 0, "float32", SMALL_SHAPE)])}
            return case("segarg", [head("call", body, rid)], name)
        if not stolen:
            return case("notowner", worker_request(core, secrets.token_urlsafe(32), rid), "random token")
        doc = rng.choice(stolen)
        if core not in doc["cores"]:
            return case("notowner", worker_request(core, doc["token"], rid),
                        f"stolen token of pid {doc['pid']} (lease {doc['lease_id']} on {doc['cores']})")
        # its own lease's core: requests that can never succeed, one of which runs the owner's model and asks for
        # the outputs in a foreign segment
        mine = [(mid, shape) for c, mid, shape in doc["models"] if c == core]
        detail = (doc["lease_id"], core, doc["pid"])
        if mine and rng.random() < 0.6:
            mid, shape = rng.choice(mine)
            body = {"token": doc["token"], "model_id": mid, "args": tup([tref(1, "float32", shape)]),
                    "reply_shm": foreign_segment(doc["pid"]), "reply_shm_size": 1 << 20}
            return case("held", [head("call", body, rid), small if shape == SMALL_SHAPE else big], detail)
        if rng.random() < 0.5:
            return case("held", [head("unload", {"token": doc["token"], "model_id": rng.randint(1 << 40, 1 << 50)},
                                      rid)], detail)
        return case("held", [head("load", {"token": doc["token"], "name": "fuzz", "data": tref(1, "uint8", [64])},
                                  rid), os.urandom(64)], detail)

    lease16 = lambda: secrets.token_hex(8)  # noqa: E731

    def broker_case():
        r = rng.random()
        rid = next(ids)
        if r < 0.3:
            return case("err", [randbytes(0, 300) for _ in range(rng.randint(1, 3))])
        if r < 0.5:  # mutations of requests that fail whatever the mutation
            return case("err", [mutate(head(rng.choice(("heartbeat", "acquire")), {"lease_id": lease16()}, rid))])
        # requests that look right but are not: never a valid stop, drain or force_release
        body = rng.choice([
            ("heartbeat", {"lease_id": lease16()}, V),  # unknown lease
            ("heartbeat", {"lease_id": 5}, V), ("heartbeat", {}, V),
            ("stop", {"now": True}, V), ("drain", {"resume": 1}, V), ("drain", {"resume": "yes"}, V),
            ("force_release", {"pid": str(os.getpid())}, V), ("force_release", {}, V),
            ("force_release", {"pid": 1.5}, V),
            ("acquire", {"cmd": "fuzz", "count": 1}, V), ("release", {"lease_id": lease16()}, V),
            ("reattach", {"lease_id": lease16(), "token": "x"}, V),
            ("format_disk", {}, V), ("status", {}, V + 1), ("ping", {"x": 1}, V), (5, {}, V),
            ("status", [], V),
        ])
        frames = [head(body[0], body[1], rid, body[2])]
        if rng.random() < 0.1:
            frames.append(b"extra frame")
        return case("err", frames)

    def lease_frame(msg: bytes) -> bytes:
        return len(msg).to_bytes(4, "big") + msg

    def lease_case():
        r = rng.random()
        rid = next(ids)
        if r < 0.25:
            body = randbytes(1, 400)
            return case("err", [body])
        if r < 0.55:  # valid frames, wrong types or values; never an acquire that could be granted
            op, body = rng.choice([
                ("acquire", {"cmd": "fuzz", "count": -1}), ("acquire", {"cmd": "fuzz", "count": 1 << 30}),
                ("acquire", {"cmd": "fuzz", "count": "1"}), ("acquire", {"cmd": "fuzz", "visible": "0"}),
                ("acquire", {"cmd": "fuzz", "visible": [n_cores + 3]}), ("acquire", {"cmd": "fuzz", "visible": [0.5]}),
                ("acquire", {"cmd": "fuzz", "visible": [0, 0]}), ("acquire", {"cmd": "fuzz", "visible": []}),
                ("acquire", {"cmd": "fuzz", "count": 1, "wait_s": -1.0}),
                ("acquire", {"cmd": "fuzz", "count": 1, "wait_s": 1e12}), ("acquire", {"cmd": 7}),
                ("acquire", {"count": 1}), ("reattach", {"lease_id": 5, "token": "x"}), ("reattach", {}),
                ("release", {"lease_id": None}), ("status", {}), ("stop", {}), ("drain", {}),
                ("force_release", {"pid": 1}), ("ping", {}), ("granted", {}),
            ])
            return case("err", [head(op, body, rid)])
        if r < 0.65:
            return case("err", [mutate(head("reattach", {"lease_id": lease16(), "token": "t" * 43}, rid))])
        if r < 0.75:
            return case("err", [head("reattach", {"lease_id": lease16(), "token": secrets.token_urlsafe(32)}, rid)])
        if not stolen:
            return case("err", [head("reattach", {"lease_id": lease16(), "token": secrets.token_urlsafe(32)}, rid)])
        doc = rng.choice(stolen)
        if r < 0.92:
            return case("reattach", [head("reattach", {"lease_id": doc["lease_id"], "token": doc["token"]}, rid)],
                        f"lease {doc['lease_id']} of pid {doc['pid']}")
        return case("release", [head("release", {"lease_id": doc["lease_id"]}, rid)],
                    f"lease {doc['lease_id']} of pid {doc['pid']}")

    def judge(c, reply_head: dict | None, t_sent: float) -> None:
        kind, _, _, detail = c
        op = reply_head.get("op") if reply_head else None
        body = reply_head.get("body") if reply_head and isinstance(reply_head.get("body"), dict) else {}
        code = body.get("code") if op == "error" else None
        if op == "error":
            codes[code] = codes.get(code, 0) + 1
        if kind == "release":
            count("ok: release of another's lease (no effect)" if op == "ok" else
                  "error reply" if op == "error" else "unexpected reply")
            if op not in ("ok", "error"):
                violation(f"release of {detail}: reply {op!r}")
            return
        if op != "error":
            what = {"reattach": f"a stolen lease was re-attached ({detail})",
                    "held": f"a foreign reply segment was accepted (core {detail and detail[1]})",
                    "segarg": f"arguments in foreign segment {detail} were accepted",
                    "notowner": f"a request with a {detail} was answered {op!r}"}.get(kind, f"reply {op!r}")
            violation(f"{kind}: {what}")
            count("non-error replies")
            return
        if kind == "notowner":
            if code == "NOT_OWNER":
                count("refused: not the owner")
            else:
                violation(f"a request with a {detail} passed the token check (reply {code}: "
                          f"{str(body.get('message'))[:160]})")
            return
        if kind == "held":
            if code == "NOT_OWNER":
                count("refused: stolen token on its lease's own core, after the lease ended")
                held_refusals.append((detail[0], detail[1], t_sent, now()))
            else:  # PROTOCOL: the foreign reply segment refused; UNKNOWN_MODEL, LOAD_ERROR: the bad request
                count(f"refused: stolen token on its lease's own core ({code})")
            return
        if kind == "segarg":
            msg = str(body.get("message"))
            count("refused: foreign shared-memory segment" if "refused" in msg or "not one of" in msg else
                  "error reply")
            return
        count("refused: not the owner" if code == "NOT_OWNER" else "error reply")

    # -- connections ---------------------------------------------------------------------------------------------
    poller = zmq.Poller()

    class Conn:
        """One socket with at most one batch in flight: its cases, by expected reply id, in sending order."""

        def __init__(self, target: str):
            self.target = target
            self.sock = None
            self.pending: dict[int, list] = {}
            self.n = 0
            self.sent_at = 0.0
            self.epoch = ""
            self.retried = False
            self.buf = b""

        def open(self) -> bool:
            try:
                if self.target == "lease":
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(2.0)
                    s.connect(lease_path)
                else:
                    s = transport.dealer(f"ipc://{directory}/broker.sock" if self.target == "broker" else
                                         f"ipc://{directory}/{self.target}.sock")
            except OSError:
                return False
            self.sock = s
            poller.register(s, zmq.POLLIN)
            return True

        def key(self):  # what the poller gives back: the ZeroMQ socket, or a plain socket's descriptor
            return self.sock.fileno() if self.target == "lease" else id(self.sock)

        def close(self) -> None:
            if self.sock is not None:
                try:
                    poller.unregister(self.sock)
                except KeyError:
                    pass
                try:
                    self.sock.close() if self.target == "lease" else self.sock.close(linger=0)
                except Exception:
                    pass
            self.sock, self.buf = None, b""

        def send(self, cases: list) -> None:
            if self.sock is None and not self.open():
                count("not sent: target down", len(cases))
                return
            self.pending, self.n = {}, 0
            try:
                if self.target == "lease":
                    self.sock.sendall(b"".join(lease_frame(c[1][0]) for c in cases))
                else:
                    for c in cases:
                        self.sock.send_multipart(c[1], flags=zmq.NOBLOCK)
            except (OSError, zmq.ZMQError):
                self.close()
                count("not sent: target down", len(cases))
                return
            for c in cases:
                self.pending.setdefault(c[2], []).append(c)
                self.n += 1
            self.sent_at, self.epoch = now(), epoch()

        def replies(self) -> list:
            out = []
            if self.target == "lease":
                try:
                    data = self.sock.recv(1 << 16)
                except (BlockingIOError, socket.timeout):
                    return out
                except OSError:
                    data = b""
                if not data:
                    self.close()
                    return out
                self.buf += data
                while len(self.buf) >= 4:
                    n = int.from_bytes(self.buf[:4], "big")
                    if len(self.buf) < 4 + n:
                        break
                    out.append([self.buf[4:4 + n]])
                    self.buf = self.buf[4 + n:]
                return out
            while True:
                try:
                    out.append(self.sock.recv_multipart(flags=zmq.NOBLOCK))
                except zmq.Again:
                    return out

        def take(self, frames) -> None:
            try:
                h = msgpack.unpackb(frames[0], raw=False, strict_map_key=False, ext_hook=lambda c, d: None)
            except Exception:
                h = None
            if not isinstance(h, dict):
                count("unreadable replies")
                return
            rid = h.get("id") if type(h.get("id")) is int else 0
            waiting = self.pending.get(rid)
            if not waiting:
                count("replies to nothing sent (late, after a retry)")
                return
            c = waiting.pop(0)
            if not waiting:
                del self.pending[rid]
            self.n -= 1
            count("cases")
            tally(self.target, "cases")
            tally(self.target, "replies")
            if h.get("op") == "error":
                tally(self.target, "errors")
                if isinstance(h.get("body"), dict) and h["body"].get("code") == "NOT_OWNER":
                    tally(self.target, "NotOwnerError")
            judge(c, h, self.sent_at)
            if h.get("op") == "granted":  # never: but a grant must not stay held by the fuzzer
                self.close()

        def expire(self) -> None:
            """The batch's unanswered cases: once more on a fresh socket, or counted as unanswered."""
            left = [c for cs in self.pending.values() for c in cs]
            self.pending, self.n = {}, 0
            self.close()
            restarted = os.path.exists(down_marker) or epoch() != self.epoch
            if restarted:
                self.timeouts(len(left), "no reply: the broker was restarting")
                self.retried = False
                return
            if not self.retried:
                self.retried = True
                count("sent again (the target was replaced under the batch)", len(left))
                self.send(left)
                return
            self.retried = False
            self.timeouts(len(left), "no reply, twice (the target replaced again?)")

        def timeouts(self, n: int, why: str) -> None:
            count("cases", n)
            count(why, n)
            tally(self.target, "cases", n)
            tally(self.target, "timeouts", n)

    def oneshot() -> None:
        """A raw connection to the lease socket: random bytes (their length prefix is over the limit: an error
        reply, then the broker closes it), or a truncated frame then EOF (closed, no reply)."""
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3.0)
            s.connect(lease_path)
        except OSError:
            count("not sent: target down")
            return
        try:
            truncated = rng.random() < 0.3
            if truncated:
                s.sendall((100).to_bytes(4, "big") + os.urandom(rng.randint(0, 99)))
            else:
                s.sendall(bytes([rng.randint(1, 255)]) + rng.randbytes(rng.randint(3, 200)))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
            count("cases")
            tally("lease", "cases")
            if data:
                tally("lease", "replies")
                tally("lease", "errors")
            if truncated:
                count("closed without reply (truncated frame, expected)" if not data else "error reply")
                return
            try:
                h = msgpack.unpackb(data[4:4 + int.from_bytes(data[:4], "big")], raw=False,
                                    strict_map_key=False, ext_hook=lambda c, d: None)
            except Exception:
                h = None
            if isinstance(h, dict) and h.get("op") == "error" and isinstance(h.get("body"), dict):
                codes[h["body"].get("code")] = codes.get(h["body"].get("code"), 0) + 1
                count("error reply")
                return
            if os.path.exists(down_marker):
                count("no reply: the broker was restarting")
            else:
                violation(f"raw bytes on the lease socket: closed without an error reply ({len(data)} bytes back)")
        except OSError as exc:  # a timeout under load, or the broker going away meanwhile: no reply, not a verdict
            count("cases")
            tally("lease", "cases")
            tally("lease", "timeouts")
            count("no reply: the broker was restarting" if os.path.exists(down_marker) else
                  f"no reply on a raw connection ({type(exc).__name__})")
        finally:
            s.close()

    conns = [Conn(t) for t in list(cfg["targets"]) * 2]  # two sockets, two batches in flight, per target
    by_sock = {}
    until, target = cfg["until"], cfg["cases"]
    hard_end = until + cfg["overtime"]  # short of its cases at the end of the chaos phase: on for at most this long
    started = now()
    rate = 1.1 * target / max(1.0, until - started)
    sent = 0
    rr = 0
    at_until = None
    while True:
        t_now = now()
        if t_now >= until and at_until is None:
            at_until = counts.get("cases", 0)
        if t_now >= hard_end or (t_now >= until and sent >= target):
            break
        scan()
        down = os.path.exists(down_marker)
        budget = (rate * (t_now - started) if t_now < until else target) + BATCH - sent
        for _ in range(len(conns)):
            if down or budget < BATCH:
                break
            conn = conns[rr % len(conns)]
            rr += 1
            t = conn.target
            if conn.n:
                continue
            if t == "lease":
                cases = [lease_case() for _ in range(BATCH)]
                if rng.random() < 0.3:
                    oneshot()
                    sent += 1
            elif t == "broker":
                cases = [broker_case() for _ in range(BATCH)]
            else:
                core = int(t.split("-")[1])
                cases = [worker_case(core) for _ in range(BATCH)]
            conn.send(cases)
            sent += len(cases)
            budget -= len(cases)
        by_sock = {c.key(): c for c in conns if c.sock is not None}
        for sock, _ in poller.poll(20):
            conn = by_sock.get(sock if isinstance(sock, int) else id(sock))
            if conn is None or conn.sock is None:
                continue
            for frames in conn.replies():
                conn.take(frames)
        for conn in conns:
            if conn.n and (conn.sock is None or now() - conn.sent_at > FUZZ_REPLY_TIMEOUT_S):
                conn.expire()
            elif conn.n == 0 and conn.pending == {}:
                conn.retried = False
    deadline = now() + FUZZ_REPLY_TIMEOUT_S  # the last batches' replies
    while any(c.n for c in conns) and now() < deadline:
        by_sock = {c.key(): c for c in conns if c.sock is not None}
        for sock, _ in poller.poll(50):
            conn = by_sock.get(sock if isinstance(sock, int) else id(sock))
            if conn is not None and conn.sock is not None:
                for frames in conn.replies():
                    conn.take(frames)
    for conn in conns:
        if conn.n:
            conn.timeouts(conn.n, "no reply: the broker was restarting" if os.path.exists(down_marker) or
                          epoch() != conn.epoch else "no reply yet when the run ended")
        conn.close()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(work, f"fuzz-{cfg['index']}.json"), "w") as f:
        json.dump({"counts": counts, "codes": codes, "violations": violations, "held_refusals": held_refusals,
                   "groups": groups, "cpu_s": ru.ru_utime + ru.ru_stime,
                   "after_chaos": counts.get("cases", 0) - (counts.get("cases", 0) if at_until is None else at_until)},
                  f)


# -- the conductor ---------------------------------------------------------------------------------------------------

class RWLock:
    """Small faults share it; a broker restart takes it alone (and waits for no new small fault to begin)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.readers = 0
        self.writer = False
        self.writers_waiting = 0

    def shared(self):
        return _Held(self, False)

    def exclusive(self):
        return _Held(self, True)


class _Held:
    def __init__(self, lock: RWLock, exclusive: bool):
        self.lock, self.exclusive = lock, exclusive

    def __enter__(self):
        lk = self.lock
        with lk.cond:
            if self.exclusive:
                lk.writers_waiting += 1
                while lk.writer or lk.readers:
                    lk.cond.wait()
                lk.writers_waiting -= 1
                lk.writer = True
            else:
                while lk.writer or lk.writers_waiting:
                    lk.cond.wait()
                lk.readers += 1

    def __exit__(self, *exc):
        lk = self.lock
        with lk.cond:
            if self.exclusive:
                lk.writer = False
            else:
                lk.readers -= 1
            lk.cond.notify_all()


class Run:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="neuron-chaos-")
        self.directory = os.path.join(self.work, "broker")
        self.obs = os.path.join(self.work, "obs")
        for d in (self.directory, self.obs, os.path.join(self.work, "tokens")):
            os.makedirs(d, mode=0o700)
        os.environ.update(NEURON_BROKER_DIR=self.directory, NEURON_BROKER_AUTOSTART="0")
        for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_RT_ACQUIRE_TIMEOUT",
                    "NEURON_BROKER_ADDRESS"):
            os.environ.pop(var, None)
        self.address = f"ipc://{self.directory}/broker.sock"
        self.journal = os.path.join(self.directory, "leases.db")
        self.broker = None
        self.brokers: list = []  # every broker started (their process groups are killed at the end)
        self.procs: dict[int, tuple[float, str]] = {}  # pid -> (create time, what): every process of the run
        self.clients: dict[int, object] = {}  # pid -> multiprocessing.Process, live ones
        self.killed_at: dict[int, float] = {}  # client pid -> when kill -9 was sent
        self.dead_since: dict[int, float] = {}
        self.stopped: set[int] = set()
        self.free_times: list[float] = []
        self.status_rtts: list[float] = []  # round trips of the status requests that measure them
        self.owner_kill_wall: dict[int, float] = {}  # owner pid -> wall clock of its kill -9 (for the broker's log)
        self.restarts: list[tuple[float, float, bool]] = []  # (killed, ready, journal corrupted)
        self.journal_set_aside: list[bool] = []
        self.counts = {k: 0 for k in ("clients started", "clients killed (kill -9)", "owners killed (kill -9)",
                                      "workers killed (kill -9)", "broker killed (kill -9) and restarted",
                                      "journal corrupted while the broker was down",
                                      "journal locked (exclusive, 1 s)", "clients stopped (SIGSTOP 1-3 s)",
                                      "status reads")}
        self.violations: list[str] = []
        self.violation_counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.faults = RWLock()
        self.stop = threading.Event()
        self.last_doc = None  # the last StatusDoc
        self.seq = 0
        self.rng = random.Random(args.seed)
        import multiprocessing as mp

        self.ctx = mp.get_context("forkserver")
        # the forkserver imports torch and the runtime once; every client and the fuzzer is a fork of it
        self.ctx.set_forkserver_preload(["__main__", "torch", "neuron_client", "neuron_client.runtime.lease",
                                         "neuron_client.models.neuron_model", "zmq", "msgpack"])

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def track(self, pid: int, what: str) -> None:
        import psutil

        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        with self.lock:
            self.procs.setdefault(pid, (created, what))

    def alive(self, pid: int) -> bool:
        """The tracked process ``pid`` still runs (stopped counts as running; a zombie or a reused pid does not)."""
        import psutil

        entry = self.procs.get(pid)
        try:
            p = psutil.Process(pid)
            if entry is not None and abs(p.create_time() - entry[0]) > 0.05:
                return False
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def violate(self, kind: str, text: str) -> None:
        with self.lock:
            self.violation_counts[kind] = self.violation_counts.get(kind, 0) + 1
            if len(self.violations) < 40:
                self.violations.append(f"{kind}: {text}")

    def status(self, timeout_s: float = 2.0):
        from neuron_client.wire.broker_client import BrokerClient

        with BrokerClient(self.address) as broker:
            return broker.status(timeout_s)

    # -- processes -------------------------------------------------------------------------------------------
    def start_broker(self) -> None:
        """The broker at its default settings (only the core count is given), in the same directory every time."""
        from broker.embedded import EmbeddedBroker

        run = self

        class Broker(EmbeddedBroker):
            def wait_ready(self, timeout_s: float) -> None:
                # known (and killed at the end, whatever happens) from the moment its process exists
                with run.lock:
                    run.brokers.append(self)
                with open(os.path.join(run.work, "pgids"), "a") as f:
                    f.write(f"{self.proc.pid}\n")
                run.track(self.proc.pid, "broker")
                super().wait_ready(timeout_s)

        self.broker = Broker(self.args.cores, directory=self.directory)
        self.track_broker_children()

    def track_broker_children(self) -> None:
        import psutil

        b = self.broker
        if b is None or b.proc.poll() is not None:
            return
        try:
            for child in psutil.Process(b.proc.pid).children(recursive=True):
                self.track(child.pid, "worker or the broker's forkserver")
        except psutil.Error:
            pass

    def spawn_client(self) -> None:
        with self.lock:
            self.seq += 1
            i = self.seq
        cfg = {"work": self.work, "directory": self.directory, "small": self.small, "big": self.big,
               "cores": self.args.cores, "until": self.until, "seed": self.args.seed * 1000 + i,
               "spinner": i % 4 == 1, "collector": i % 4 == 2, "token_writer": i % 4 == 0}
        p = self.ctx.Process(target=client_main, args=(cfg,), name=f"chaos-client-{i}", daemon=False)
        p.start()
        self.track(p.pid, "client")
        with self.lock:
            self.clients[p.pid] = p
            self.counts["clients started"] += 1

    def spawn_cpu_hogs(self) -> None:
        self.hogs = []
        for _ in range(self.args.hogs):
            p = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
            self.hogs.append(p)
            self.track(p.pid, "busy loop")

    # -- faults ----------------------------------------------------------------------------------------------
    def owners_now(self) -> dict[int, list[int]]:
        doc = self.last_doc
        out: dict[int, list[int]] = {}
        for lease in doc.leases if doc is not None else []:
            if lease.pid in self.clients and lease.state == "active":
                out.setdefault(lease.pid, []).extend(lease.cores)
        return out

    def kill_client(self) -> None:
        owners = {p: c for p, c in self.owners_now().items() if p not in self.stopped}
        with self.lock:
            live = [p for p in self.clients if p not in self.stopped]
        if not live:
            return
        pid = self.rng.choice(sorted(owners)) if owners and self.rng.random() < 0.8 else self.rng.choice(live)
        proc = self.clients.get(pid)
        if proc is None:
            return
        t = now()
        self.killed_at[pid] = t
        if pid in owners:
            self.owner_kill_wall[pid] = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it had just finished
            self.killed_at.pop(pid, None)
            self.owner_kill_wall.pop(pid, None)
            return
        proc.join(10)
        with self.lock:
            self.clients.pop(pid, None)
            self.counts["clients killed (kill -9)"] += 1
        self.spawn_client()
        if pid in owners:
            self.counts["owners killed (kill -9)"] += 1
            deadline = t + 10.0
            while now() < deadline:
                t0 = now()
                try:
                    doc = self.status()
                except Exception:
                    time.sleep(0.01)
                    continue
                self.status_rtts.append(now() - t0)
                if not any(c.owner and c.owner.pid == pid for c in doc.cores):
                    self.free_times.append(now() - t)
                    return
                time.sleep(0.005)
            self.violate("dead owner's cores not freed", f"pid {pid} still owns cores 10 s after kill -9")

    def kill_worker(self) -> None:
        doc = self.last_doc
        if not doc:
            return
        core = self.rng.choice(doc.cores)
        pid = core.worker.pid
        if core.worker.ready and pid:
            self.track(pid, "worker or the broker's forkserver")
            try:
                os.kill(pid, signal.SIGKILL)
                self.counts["workers killed (kill -9)"] += 1
            except ProcessLookupError:
                pass

    def stop_client(self) -> None:
        import psutil

        owners = self.owners_now()
        with self.lock:
            live = [p for p in self.clients if p not in self.stopped]
        candidates = [p for p in owners if p in live] or live
        if not candidates:
            return
        pid = self.rng.choice(candidates)
        self.stopped.add(pid)
        try:
            os.kill(pid, signal.SIGSTOP)
            for _ in range(100):
                if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    break
                time.sleep(0.01)
            time.sleep(0.2)  # a release it began before the stop has reached the broker
            before = {le.lease_id for le in self.status().leases if le.pid == pid}
            time.sleep(self.rng.uniform(1.0, 3.0))
            after = {le.lease_id for le in self.status().leases if le.pid == pid}
            self.counts["clients stopped (SIGSTOP 1-3 s)"] += 1
            if before - after:
                self.violate("stopped owner lost its cores", f"pid {pid} lost leases {sorted(before - after)} while "
                                                             "stopped by SIGSTOP")
        except (psutil.Error, ProcessLookupError, OSError):
            pass
        except Exception as exc:  # the status could not be read: not a verdict
            print(f"\n[chaos] SIGSTOP check of pid {pid} skipped: {type(exc).__name__}: {exc}", flush=True)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.stopped.discard(pid)

    def lock_journal(self) -> None:
        con = sqlite3.connect(self.journal, isolation_level=None, timeout=5.0)
        try:
            con.execute("BEGIN EXCLUSIVE")
            time.sleep(1.0)
            con.execute("ROLLBACK")
            self.counts["journal locked (exclusive, 1 s)"] += 1
        finally:
            con.close()

    def corrupt_journal(self) -> None:
        """While the broker is down: the journal (and its WAL) overwritten with garbage and cut short, or with
        ``--journal-fault truncate`` cut to 0 bytes."""
        rng = self.rng
        for path in (self.journal, self.journal + "-wal"):
            if not os.path.exists(path):
                continue
            size = os.path.getsize(path)
            if self.args.journal_fault == "truncate":
                os.truncate(path, 0)
                continue
            with open(path, "r+b") as f:
                f.write(os.urandom(min(size, 512) or 512))
            if size > 1024:
                os.truncate(path, rng.randint(512, size // 2))
        self.counts["journal corrupted while the broker was down"] += 1

    def restart_broker(self, corrupt: bool) -> None:
        with self.faults.exclusive():
            down = os.path.join(self.work, "broker-down")
            open(down, "w").close()
            old = self.broker
            self.track_broker_children()
            t = now()
            os.kill(old.proc.pid, signal.SIGKILL)
            old.proc.wait(10)
            old.log.close()
            if corrupt:
                self.corrupt_journal()
            aside = set(glob.glob(self.journal + ".unreadable-*"))
            try:
                self.start_broker()
            finally:
                with open(os.path.join(self.work, "epoch"), "w") as f:
                    f.write(str(len(self.restarts) + 1))
                os.unlink(down)
            self.restarts.append((t, now(), corrupt))
            self.counts["broker killed (kill -9) and restarted"] += 1
            if corrupt:
                set_aside = bool(set(glob.glob(self.journal + ".unreadable-*")) - aside)
                self.journal_set_aside.append(set_aside)
                if not set_aside:
                    self.violate("corrupt journal not set aside", "the broker started with the corrupted journal "
                                                                  "without setting it aside")

    def small_faults(self) -> None:
        rng = random.Random(self.args.seed + 1)
        while not self.stop.wait(rng.uniform(0.6, 1.4)) and now() < self.until - 1.0:
            with self.faults.shared():
                r = rng.random()
                try:
                    if r < 0.6:
                        self.kill_client()
                    else:
                        self.kill_worker()
                except Exception as exc:
                    print(f"\n[chaos] fault skipped: {type(exc).__name__}: {exc}", flush=True)

    def stops(self) -> None:
        rng = random.Random(self.args.seed + 2)
        while not self.stop.wait(rng.uniform(2.0, 5.0)) and now() < self.until - 4.0:
            with self.faults.shared():
                self.stop_client()

    def big_faults(self) -> None:
        """Broker restarts at fixed fractions of the run (the last one with the journal corrupted first), journal
        locks spread over the run; one at a time."""
        d = self.until - self.began
        plan = [(f * d, "restart", f == self.args.corrupt_at) for f in self.args.restart_at]
        plan += [(f * d, "lock", False) for f in self.args.lock_at]
        plan.sort()
        for at, what, corrupt in plan:
            while not self.stop.is_set() and now() < self.began + at:
                time.sleep(0.05)
            if self.stop.is_set() or now() > self.until - 1.0:
                return
            try:
                if what == "restart":
                    self.restart_broker(corrupt)
                else:
                    with self.faults.shared():
                        self.lock_journal()
            except Exception as exc:
                print(f"\n[chaos] {what} failed: {type(exc).__name__}: {exc}", flush=True)
                if what == "restart":
                    self.violate("broker restart failed", f"{type(exc).__name__}: {exc}")
                    return

    def monitor(self) -> None:
        """Status every 100 ms: the latest document for the faults, and no core of a dead owner kept long."""
        while not self.stop.wait(0.1):
            try:
                doc = self.status()
            except Exception:
                continue
            self.last_doc = doc
            self.counts["status reads"] += 1
            if self.counts["status reads"] % 5 == 0:
                self.track_broker_children()
            t = now()
            for core in doc.cores:
                owner = core.owner
                if not owner or owner.pid not in self.procs:
                    continue
                pid = owner.pid
                if self.alive(pid):
                    self.dead_since.pop(pid, None)
                    continue
                since = self.dead_since.setdefault(pid, self.killed_at.get(pid, t))
                if t - since > DEAD_OWNER_LIMIT_S:
                    self.violate("dead owner kept", f"core {core['core']} still owned by dead pid {pid} "
                                                    f"{t - since:.1f}s after its death")
                    self.dead_since[pid] = t + 3600  # once per owner

    # -- after the run ---------------------------------------------------------------------------------------
    def analyse(self) -> dict:
        """Merge the clients' logs: overlaps per core, lost leases, errors, operations."""
        intervals: dict[int, list] = {}
        calls: dict[int, list] = {}
        ops = {"acquires granted": 0, "acquires refused: cores busy": 0, "acquires refused: journal locked": 0,
               "acquires failed: broker away": 0, "acquires failed: grant abandoned": 0, "calls": 0,
               "wrong results": 0, "reload warnings": 0}
        lost = {"without cause": [], "restart": [], "journal": []}
        errors: dict[str, int] = {}
        unexplained: list[str] = []
        open_intervals = 0

        from broker.state import RESTART_GRACE_S

        def window(t: float):
            """Whether ``t`` falls after the latest broker restart begun by then, within its grace period (and a
            margin): "journal" if that restart found its journal corrupted, else "restart"; None otherwise."""
            latest = [r for r in self.restarts if r[0] - 0.5 <= t]
            if latest:
                killed, ready, corrupt = latest[-1]
                if t <= ready + RESTART_GRACE_S + RESTART_MARGIN_S:
                    return "journal" if corrupt else "restart"
            return None

        for path in glob.glob(os.path.join(self.obs, "*.log")):
            pid = int(os.path.basename(path).split(".")[0])
            current = None
            with open(path) as f:
                lines = f.read().splitlines()
            for line in lines:
                p = line.split(" ")
                kind = p[0]
                if kind == "B":
                    current = (p[1], [int(c) for c in p[2].split(",")], float(p[3]))
                    ops["acquires granted"] += 1
                elif kind == "E" and current is not None:
                    for c in current[1]:
                        intervals.setdefault(c, []).append((current[2], float(p[2]), pid, current[0]))
                    current = None
                elif kind == "C":
                    ops["calls"] += 1
                    if p[4] != "1":
                        ops["wrong results"] += 1
                        self.violate("wrong result", f"pid {pid} got a wrong result on core {p[1]} at {p[2]}")
                    calls.setdefault(int(p[1]), []).append((float(p[2]), float(p[3]), pid, "call"))
                elif kind == "W":
                    ops["reload warnings"] += 1
                elif kind == "L":
                    t, text = float(p[1]), " ".join(p[2:])
                    w = window(t)
                    lost["journal" if w == "journal" else "restart" if w else "without cause"].append(
                        f"pid {pid} at {t - self.began:.1f}s: {text}")
                elif kind == "X":
                    t, phase, what = float(p[1]), p[2], p[3]
                    if phase == "acquire":
                        key = {"conflict": "acquires refused: cores busy",
                               "journal": "acquires refused: journal locked",
                               "unavailable": "acquires failed: grant abandoned"}.get(
                                   what, "acquires failed: broker away")
                        ops[key] += 1
                        if key.startswith("acquires failed") and window(t) is None:
                            unexplained.append(f"pid {pid} at {t - self.began:.1f}s: acquire: {' '.join(p[3:])}")
                    else:
                        w = window(t)
                        errors[f"{what}{' (across a broker restart)' if w else ''}"] = errors.get(
                            f"{what}{' (across a broker restart)' if w else ''}", 0) + 1
                        if w is None and what != "WorkerUnavailableError":
                            unexplained.append(f"pid {pid} at {t - self.began:.1f}s: {' '.join(p[3:])}")
            if current is not None:  # killed while owning: it owned until the kill
                end = self.killed_at.get(pid)
                if end is None:
                    open_intervals += 1
                    end = float("inf")
                for c in current[1]:
                    intervals.setdefault(c, []).append((current[2], end, pid, current[0]))
        overlaps = 0
        call_overlaps = 0
        for core in sorted(set(intervals) | set(calls)):
            found = find_overlaps(intervals.get(core, []))
            overlaps += len(found)
            for a, b in found[:3]:
                self.violate("two owners at once", f"core {core}: pid {a[2]} (lease {a[3]}, {a[0] - self.began:.3f}"
                                                   f"..{a[1] - self.began:.3f}s) and pid {b[2]} (lease {b[3]}, "
                                                   f"{b[0] - self.began:.3f}..{b[1] - self.began:.3f}s)")
            # a call of one process inside another's ownership of the same core: both really used it
            call_overlaps += len([1 for a, b in find_overlaps(intervals.get(core, []) + calls.get(core, []))
                                  if "call" in (a[3], b[3])])
        for text in lost["without cause"]:
            self.violate("live owner lost its cores", text)
        for text in lost["restart"]:
            self.violate("live owner lost its cores across a broker restart (journal intact)", text)
        return {"ops": ops, "lost": lost, "errors": errors, "unexplained": unexplained, "overlaps": overlaps,
                "call_overlaps": call_overlaps, "open_intervals": open_intervals,
                "intervals": sum(len(v) for v in intervals.values())}

    def memory_cycles(self, cycles: int) -> tuple[int, int]:
        """RSS of a worker before and after ``cycles`` load/unload cycles of a 16 MB model (in this process)."""
        import torch

        import neuron_client
        from neuron_client.runtime import lease as runtime_mod
        from neuron_client.runtime.lease import Runtime

        path = os.path.join(self.work, "wide.pt")
        torch.jit.save(neuron_client.trace(torch.nn.Linear(2048, 2048), torch.rand(1, 2048)), path)
        rt = Runtime(env={"NEURON_RT_VISIBLE_CORES": "0"})
        runtime_mod._runtime = rt
        try:
            def rss():
                time.sleep(0.7)
                return self.status(10.0).cores[0].worker.memory_bytes

            def cycle(n: int) -> None:
                for _ in range(n):
                    m = neuron_client.jit.load(path)
                    m(torch.rand(1, 2048))
                    m.unload()

            cycle(3)  # warm the allocator
            cycle(cycles // 2)  # the allocator settles during the first half
            before = rss()
            cycle(cycles - cycles // 2)
            return before, rss()
        finally:
            rt.close()
            runtime_mod._runtime = None

    def lease_end_delays(self) -> list[float]:
        """Seconds from each owner's kill -9 to the broker's first log line after it ending a lease of that pid
        ("ended: owner exited", or "released" when the broker saw the link close before the pidfd; milliseconds)."""
        import datetime
        import re

        ends: dict[int, list[float]] = {}
        pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) broker \w+ (?:lease \S+ of pid (\d+) .* "
                             r"ended: owner exited|pid (\d+) released )")
        try:
            with open(os.path.join(self.directory, "broker.log"), errors="replace") as f:
                for line in f:
                    m = pattern.match(line)
                    if m:
                        pid = int(m.group(2) or m.group(3))
                        if pid in self.owner_kill_wall:
                            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                            ends.setdefault(pid, []).append(stamp)
        except OSError:
            return []
        out = []
        for pid, killed in self.owner_kill_wall.items():
            after = [e for e in ends.get(pid, []) if e >= killed - 0.002]
            if after:
                out.append(max(0.0, min(after) - killed))
        return out

    def stop_broker_gracefully(self) -> list[int]:
        """SIGTERM the broker (it stops its workers); the pids of its process tree still running 10 s later."""
        import psutil

        b = self.broker
        self.track_broker_children()
        try:
            tree = [b.proc.pid] + [c.pid for c in psutil.Process(b.proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = [b.proc.pid]
        b.proc.send_signal(signal.SIGTERM)
        try:
            b.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        deadline = now() + 10
        while now() < deadline and any(self.alive(p) for p in tree):
            time.sleep(0.1)
        return [p for p in tree if self.alive(p)]

    def cleanup(self) -> None:
        """Whatever is left, by pid or by the brokers' process groups (after the leak count)."""
        for pid, proc in list(self.clients.items()):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in list(self.clients.values()):
            proc.join(2)
        for p in getattr(self, "hogs", []):
            p.kill()
            p.wait()
        for fz in getattr(self, "fuzzers", []):
            if fz.is_alive():
                fz.kill()
        for b in self.brokers:
            try:
                os.killpg(b.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if b.proc.poll() is None:
                b.proc.wait(5)
            try:
                b.log.close()
            except Exception:
                pass
        try:
            from multiprocessing import forkserver

            forkserver._forkserver._stop()
        except Exception:
            pass
        try:  # segments of clients killed here, whose broker is gone too (the run was interrupted)
            from neuron_client.wire import shm

            for pid, (_, what) in list(self.procs.items()):
                if what in ("client", "fuzzer") and not self.alive(pid):
                    shm.unlink_for_pid(pid)
        except Exception:
            pass

    def main(self) -> int:
        import torch

        import neuron_client
        from neuron_client.wire import shm

        class Model(torch.nn.Module):
            def forward(self, x):
                return x * 3 - 1

        a = self.args
        self.small = os.path.join(self.work, "small.pt")
        self.big = os.path.join(self.work, "big.pt")
        torch.jit.save(neuron_client.trace(Model(), torch.rand(*SMALL_SHAPE)), self.small)
        torch.jit.save(neuron_client.trace(Model(), torch.rand(*BIG_SHAPE)), self.big)
        print(f"[chaos] {a.cores} cores at the broker's default settings, {a.clients} clients, {a.seconds:.0f} s, "
              f"{a.hogs} busy loops, >= {a.fuzz_cases} fuzz cases (work dir {self.work})", flush=True)
        t_setup = now()
        try:
            self.start_broker()
            print(f"[chaos] broker pid {self.broker.proc.pid} ready in {now() - t_setup:.1f}s", flush=True)
            self.ctx.Process(target=time.sleep, args=(0,)).start()  # starts the forkserver (imports torch) now
            self.began = now()
            self.until = self.began + a.seconds
            self.spawn_cpu_hogs()
            for _ in range(a.clients):
                self.spawn_client()
            # two fuzzer processes, each with its own lease link and broker socket and half of the workers
            self.fuzzers = []
            for i in range(FUZZERS):
                targets = ["lease", "broker"] + [f"core-{c}" for c in range(i, a.cores, FUZZERS)] + ["lease", "broker"]
                fz = self.ctx.Process(target=fuzzer_main, name=f"chaos-fuzzer-{i}", args=({
                    "work": self.work, "directory": self.directory, "cores": a.cores, "until": self.until - 1.0,
                    "cases": a.fuzz_cases // FUZZERS, "seed": a.seed * 100 + 3 + i, "targets": targets,
                    "index": i, "overtime": FUZZ_OVERTIME_S},))
                fz.start()
                self.track(fz.pid, "fuzzer")
                self.fuzzers.append(fz)
            threads = [threading.Thread(target=fn, daemon=True, name=fn.__name__)
                       for fn in (self.monitor, self.small_faults, self.stops, self.big_faults)]
            for t in threads:
                t.start()
            while now() < self.until:
                time.sleep(1)
                c = self.counts
                print(f"[chaos] {self.until - now():4.0f} s left · {c['clients started']} clients started · "
                      f"{c['clients killed (kill -9)']} killed · {c['workers killed (kill -9)']} workers killed · "
                      f"{c['broker killed (kill -9) and restarted']} broker restarts · "
                      f"{c['clients stopped (SIGSTOP 1-3 s)']} stopped  ", end="\r", flush=True)
            print()
            self.stop.set()
            for t in threads:
                t.join(30)
            for p in self.hogs:
                p.kill()
                p.wait()
            # clients finish their cycle and exit by themselves
            deadline = now() + 60
            for pid, proc in list(self.clients.items()):
                proc.join(max(0.1, deadline - now()))
                if proc.exitcode is None:
                    os.kill(pid, signal.SIGUSR1)  # its threads' stacks, in obs/<pid>.err
            for fz in self.fuzzers:
                fz.join(max(1.0, deadline - now()))
            hung = [pid for pid, proc in self.clients.items() if proc.exitcode is None]
            for pid in hung:
                self.violate("client hung", f"pid {pid} still running 60 s after the end (stacks in "
                                            f"{self.obs}/{pid}.err)")
                os.kill(pid, signal.SIGKILL)
            for fz in self.fuzzers:
                if fz.exitcode is None:
                    self.violate("fuzzer hung", f"fuzzer pid {fz.pid} did not finish")
                    fz.kill()
            t_end = now()
            doc = None
            while now() < t_end + 5:
                try:
                    doc = self.status(5.0)
                except Exception:
                    doc = None
                if doc is not None and not any(c.owner for c in doc.cores):
                    break
                time.sleep(0.1)
            leaked_cores = [c.index for c in (doc.cores if doc is not None else []) if c.owner]
            run_pids = [p for p, (_, what) in self.procs.items() if what in ("client", "fuzzer")]
            leaked_segments = sorted(s for pid in run_pids for s in shm.segments_of(pid))
            before = after = 0
            if a.cycles:
                before, after = self.memory_cycles(a.cycles)
                leaked_segments += shm.segments_of(os.getpid())
            survivors = self.stop_broker_gracefully()
            time.sleep(0.5)
            leaked_procs = sorted({p for p, (_, what) in self.procs.items()
                                   if what != "busy loop" and self.alive(p)}
                                  | set(survivors))
            leaked_procs_desc = [f"{p} ({self.procs.get(p, (0, '?'))[1]})" for p in leaked_procs]
        finally:
            self.stop.set()
            self.cleanup()
        return self.report(leaked_cores, leaked_segments, leaked_procs_desc, before, after)

    def report(self, leaked_cores, leaked_segments, leaked_procs, before, after) -> int:
        a = self.args
        res = self.analyse()
        fuzz = {"counts": {}, "codes": {}, "violations": [], "held_refusals": [], "groups": {}, "cpu_s": 0.0,
                "after_chaos": 0}
        for i in range(FUZZERS):  # the fuzzers' results, added up
            try:
                with open(os.path.join(self.work, f"fuzz-{i}.json")) as f:
                    part = json.load(f)
            except (OSError, ValueError):
                self.violate("fuzzer", f"fuzzer {i} wrote no results")
                continue
            for key in ("counts", "codes"):
                for k, v in part[key].items():
                    fuzz[key][k] = fuzz[key].get(k, 0) + v
            for g, row in part["groups"].items():
                for k, v in row.items():
                    fuzz["groups"].setdefault(g, {})[k] = fuzz["groups"].get(g, {}).get(k, 0) + v
            fuzz["violations"] += part["violations"]
            fuzz["held_refusals"] += part["held_refusals"]
            fuzz["cpu_s"] += part["cpu_s"]
            fuzz["after_chaos"] += part["after_chaos"]
        fc = fuzz["counts"]
        for v in fuzz["violations"]:
            self.violate("fuzz", v)
        if fc.get("violations"):
            self.violation_counts["fuzz"] = fc["violations"]
        held_inside = 0
        if fuzz["held_refusals"]:
            spans = {}
            for path in glob.glob(os.path.join(self.obs, "*.log")):
                pid = int(os.path.basename(path).split(".")[0])
                with open(path) as f:
                    for line in f:
                        p = line.split()
                        if p[0] == "B":  # until its end, or its owner's kill -9
                            spans[p[1]] = [float(p[3]), self.killed_at.get(pid, float("inf"))]
                        elif p[0] == "E" and p[1] in spans:
                            spans[p[1]][1] = float(p[2])
            for lease, core, sent, answered in fuzz["held_refusals"]:
                s = spans.get(lease)
                if s and s[0] <= sent and answered <= s[1]:
                    held_inside += 1
        ft = sorted(self.free_times)
        ends = sorted(self.lease_end_delays())
        ops, lost = res["ops"], res["lost"]
        c = self.counts
        rows = [
            ("operations", None),
            ("acquires granted", ops["acquires granted"]),
            ("acquires refused: cores busy (expected)", ops["acquires refused: cores busy"]),
            ("acquires refused: journal locked (expected, a clear error)", ops["acquires refused: journal locked"]),
            ("acquires failed: broker away (restarts)", ops["acquires failed: broker away"]),
            ("acquires failed: grant abandoned", ops["acquires failed: grant abandoned"]),
            ("calls checked against the expected result", ops["calls"]),
            ("models reloaded on fresh workers (RuntimeWarning)", ops["reload warnings"]),
            ("client errors by kind", ", ".join(f"{k} {v}" for k, v in sorted(res["errors"].items())) or "none"),
            ("faults injected", None),
            *[(k, v) for k, v in c.items() if k != "status reads"],
            ("broker restarts: kill -9 to ready, workers included (s)",
             ", ".join(f"{ready - killed:.1f}{' (journal corrupted)' if bad else ''}"
                       for killed, ready, bad in self.restarts) or "none"),
            ("busy-loop processes", a.hogs),
            ("fuzzing", None),
            ("fuzz cases (requests answered or timed out)",
             f"{fc.get('cases', 0)} ({FUZZERS} fuzzer processes, {fuzz['cpu_s']:.1f} CPU s; "
             f"{fuzz['after_chaos']} after the chaos phase, while clients drained)"),
            *[(f"  {g}: cases / replies / errors (NotOwnerError) / timeouts",
               f"{r.get('cases', 0)} / {r.get('replies', 0)} / {r.get('errors', 0)} ({r.get('NotOwnerError', 0)}) / "
               f"{r.get('timeouts', 0)}") for g, r in sorted(fuzz.get("groups", {}).items())],
            *[(f"  cases: {k[len('sent: '):]}", v) for k, v in sorted(fc.items()) if k.startswith("sent: ")],
            *[(f"  {k}", v) for k, v in sorted(fc.items())
              if k not in ("cases", "violations") and not k.startswith("sent: ")],
            ("  error codes", ", ".join(f"{k} {v}" for k, v in sorted(fuzz["codes"].items(), key=str))),
            ("  stolen-token NotOwnerError on its lease's own core while the lease was held (fresh worker)",
             held_inside),
            ("invariants", None),
            ("ownership intervals checked", res["intervals"]),
            ("invariant violations: two processes owning one core at once", res["overlaps"]),
            ("invariant violations: a call inside another process's ownership", res["call_overlaps"]),
            ("invariant violations: wrong results", ops["wrong results"]),
            ("invariant violations: dead owners kept > 2 s", self.violation_counts.get("dead owner kept", 0)),
            ("invariant violations: stopped owners that lost cores",
             self.violation_counts.get("stopped owner lost its cores", 0)),
            ("invariant violations: fuzz (stolen token / lease / segment accepted, non-error reply)",
             fc.get("violations", 0)),
            ("live owners that lost cores (no restart, no force-release)", len(lost["without cause"])),
            ("live owners that lost cores across a restart, journal intact", len(lost["restart"])),
            ("live owners that lost cores when the corrupted journal was set aside (reported, see below)",
             len(lost["journal"])),
            ("corrupted journal set aside by the restarted broker",
             ", ".join("yes" if x else "NO" for x in self.journal_set_aside) or "not tried"),
            ("client errors outside restarts other than a killed worker (reported)", len(res["unexplained"])),
            ("kill -9 of an owner to the broker's log line ending its lease: median / worst (s)",
             f"{statistics.median(ends):.3f} / {ends[-1]:.3f} over {len(ends)}" if ends else "none found"),
            ("kill -9 of an owner to its cores free in status: median / worst (s)",
             f"{statistics.median(ft):.3f} / {ft[-1]:.3f} over {len(ft)} (a status round trip meanwhile: median "
             f"{statistics.median(self.status_rtts):.3f})" if ft else "none measured"),
            ("leaks", None),
            ("leaked cores (owned after the run)", len(leaked_cores)),
            ("leaked shared-memory segments (nrt-* of run processes)", len(leaked_segments)),
            ("leaked processes (still running after the run)", len(leaked_procs)),
        ]
        if a.cycles:
            rows.append((f"worker RSS growth over the last {a.cycles - a.cycles // 2} of {a.cycles} load/unload "
                         "cycles of a 16 MB model (MiB, reported)", round((after - before) / 2**20, 1)))
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print(f"{name}:" if value is None else f"  {name.ljust(width)}  {value}")
        if leaked_cores:
            self.violate("leak", f"cores {leaked_cores} still owned")
        if leaked_segments:
            self.violate("leak", f"segments {leaked_segments[:5]}")
        if leaked_procs:
            self.violate("leak", f"processes {leaked_procs[:10]}")
        if res["open_intervals"]:
            self.violate("observer", f"{res['open_intervals']} ownership intervals never ended")
        for text in lost["journal"][:5]:
            print(f"  lost with the journal: {text}")
        for text in res["unexplained"][:8]:
            print(f"  unexplained client error: {text}")
        for v in self.violations[:25]:
            print(f"  violation: {v}")
        violations = sum(n for k, n in self.violation_counts.items() if k != "leak")
        leaks = len(leaked_cores) + len(leaked_segments) + len(leaked_procs)
        bad = violations + leaks
        result = {"violations": violations, "leaks": leaks, "fuzz_cases": fc.get("cases", 0),
                  "acquires": ops["acquires granted"], "calls": ops["calls"], "overlaps": res["overlaps"],
                  "lost_without_cause": len(lost["without cause"]), "broker_restarts": len(self.restarts),
                  "kill_to_free_median_s": statistics.median(ft) if ft else None,
                  "kill_to_free_worst_s": ft[-1] if ft else None, "work": self.work}
        print(f"[chaos] result {json.dumps(result)}")
        print(f"[chaos] {'FAILED' if bad else 'OK'}")
        if not bad and not a.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if bad else 0


def find_overlaps(intervals: list) -> list:
    """Pairs of intervals (start, end, pid, tag) of different pids that overlap, sweeping by start: each interval
    is compared with the one ending last among the other pids' intervals seen so far."""
    intervals = sorted(intervals)
    best = second = None  # (end, pid, interval): the latest end, and the latest end among other pids than best's
    found = []
    for iv in intervals:
        s, e, pid = iv[0], iv[1], iv[2]
        other = best if best is not None and best[1] != pid else second
        if other is not None and other[0] > s:
            found.append((other[2], iv))
        if best is None or e > best[0]:
            if best is not None and best[1] != pid:
                second = best
            best = (e, pid, iv)
        elif pid != best[1] and (second is None or e > second[0]):
            second = (e, pid, iv)
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None, help="length of the chaos phase (default 60; 20 --quick)")
    p.add_argument("--clients", type=int, default=None, help="client processes (default 32; 12 --quick)")
    p.add_argument("--cores", type=int, default=None, help="the broker's cores (default 8; 4 --quick)")
    p.add_argument("--fuzz-cases", type=int, default=None, help="fuzz requests to send (default 100000; 15000 --quick)")
    p.add_argument("--hogs", type=int, default=None, help="busy-loop processes (default 2; 1 --quick)")
    p.add_argument("--cycles", type=int, default=None,
                   help="load/unload cycles for the worker memory check afterwards (default 100; 0 --quick)")
    p.add_argument("--journal-locks", type=int, default=None,
                   help="exclusive journal locks, spread over the run (default 5; --quick: 2, after its first restart)")
    p.add_argument("--journal-fault", choices=("corrupt", "truncate"), default="corrupt",
                   help="what happens to the journal before the last broker restart: garbage over its first bytes "
                        "and cut short (default), or cut to 0 bytes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a 20 s smoke run: fewer clients, cores and fuzz cases")
    p.add_argument("--keep", action="store_true", help="keep the work directory (it is kept anyway on failure)")
    args = p.parse_args()
    quick = args.quick
    locks_given = args.journal_locks is not None
    for name, full, small in (("seconds", 60.0, 20.0), ("clients", 32, 12), ("cores", 8, 4),
                              ("fuzz_cases", 100_000, 15_000), ("hogs", 2, 1), ("cycles", 100, 0),
                              ("journal_locks", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    # broker restarts at these fractions of the run, the journal corrupted before the last one (after it the broker
    # grants nothing for its grace period, so that owners could re-attach first)
    args.restart_at = (0.25, 0.7) if quick else (0.15, 0.38, 0.6)
    args.corrupt_at = args.restart_at[-1]
    # journal locks spread over the run, so that a lock can come just before a restart with the journal intact (a
    # release whose journal row could not be removed then meets the restart); --quick puts its two between its
    # restarts, where the corrupted journal is set aside next anyway: a smoke run that does not depend on that timing
    n = args.journal_locks
    args.lock_at = ((0.5, 0.6) if quick and not locks_given else
                    tuple((i + 0.5) / n * 0.9 for i in range(n)))
    run = Run(args)

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return run.main()


if __name__ == "__main__":
    sys.exit(main())
