"""Stress and fault mix for a bounded time; prints what happened and exits non-zero on any violation or leak.

    bash scripts/chaos [--seconds 60] [--clients 32] [--cores 8]

* ``--clients`` processes loop: acquire cores (random NEURON_RT_NUM_CORES or NEURON_RT_VISIBLE_CORES), load a model,
  call it and check the result, release; each writes a claim file per core while it holds it (written after the
  grant, removed before the release).
* a killer ``kill -9``s random clients (and replaces them) and, now and then, a random worker;
* a fuzzer sends random frames to the broker's and workers' sockets and expects an error reply to each;
* a checker reads status and the claim files every 50 ms: two live processes claiming one core at the same time is an
  invariant violation, and so is a core still owned by a dead process 2 s after its death.

Afterwards: every core must be free, no shared-memory segment of any client left, no process of the run alive, and a
load/unload cycle test reports a worker's memory growth.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# -- the client process ----------------------------------------------------------------------------------------------

def client_main(model_path: str, claims: str, stats_path: str, n_cores: int, seconds: float) -> None:
    import torch

    import neuron_client
    from neuron_client.runtime import Runtime

    rng = random.Random(os.getpid())
    done = {"cycles": 0, "calls": 0, "conflicts": 0, "errors": 0, "lost": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        env = {}
        if rng.random() < 0.5:
            env["NEURON_RT_NUM_CORES"] = str(rng.choice([1, 1, 2]))
        else:
            env["NEURON_RT_VISIBLE_CORES"] = str(rng.randrange(n_cores))
        if rng.random() < 0.3:
            env["NEURON_RT_ACQUIRE_TIMEOUT"] = "0.5"
        try:
            rt = Runtime(env=env)
        except neuron_client.NeuronCoreUnavailableError:
            done["conflicts"] += 1
            time.sleep(rng.random() * 0.2)
            continue
        except neuron_client.NeuronRuntimeError:
            done["errors"] += 1
            time.sleep(0.2)
            continue
        neuron_client.runtime._runtime = rt  # the models below use this lease
        mine = [os.path.join(claims, f"{os.getpid()}-{c}") for c in rt.cores]
        for path in mine:
            open(path, "w").close()
        try:
            m = neuron_client.jit.load(model_path)
            for _ in range(rng.randint(1, 5)):
                x = torch.rand(2, 8)
                assert torch.allclose(m(x), x * 3 - 1)
                done["calls"] += 1
            done["cycles"] += 1
        except neuron_client.LeaseLostError:
            done["lost"] += 1
        except neuron_client.NeuronRuntimeError:
            done["errors"] += 1
        finally:
            for path in mine:
                os.unlink(path)
            rt.close()
            neuron_client.runtime._runtime = None
        with open(stats_path, "w") as f:
            json.dump(done, f)


# -- the conductor ---------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="neuron-chaos-")
        self.directory = os.path.join(self.work, "broker")
        self.claims = os.path.join(self.work, "claims")
        self.stats = os.path.join(self.work, "stats")
        for d in (self.directory, self.claims, self.stats):
            os.makedirs(d, mode=0o700)
        self.env = dict(os.environ, NEURON_BROKER_DIR=self.directory, NEURON_BROKER_AUTOSTART="0",
                        PYTHONWARNINGS="ignore")
        for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES"):
            self.env.pop(var, None)
        self.address = f"ipc://{self.directory}/broker.sock"
        self.clients: list[subprocess.Popen] = []
        self.all_pids: set[int] = set()
        self.dead_at: dict[int, float] = {}
        self.counts = {"clients started": 0, "clients killed": 0, "workers killed": 0, "fuzz cases": 0,
                       "fuzz without error reply": 0, "double claims": 0, "dead owners kept > 2 s": 0,
                       "status reads": 0}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.violations: list[str] = []

    def start_broker(self) -> None:
        from broker.embedded import EmbeddedBroker

        self.broker = EmbeddedBroker(self.args.cores, directory=self.directory, extra=[
            "--lease-timeout", str(self.args.lease_timeout), "--max-restarts", "1000"])
        self.status = self.broker.status

    def spawn_client(self, seconds: float) -> None:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--client", self.model, self.claims,
             os.path.join(self.stats, f"{len(self.all_pids)}.json"), str(self.args.cores), str(seconds)],
            env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with self.lock:
            self.clients.append(proc)
            self.all_pids.add(proc.pid)
            self.counts["clients started"] += 1

    def killer(self, until: float) -> None:
        rng = random.Random(1)
        while not self.stop.wait(0.4) and time.monotonic() < until:
            with self.lock:
                live = [p for p in self.clients if p.poll() is None]
            if live and rng.random() < 0.6:
                victim = rng.choice(live)
                victim.kill()
                victim.wait(10)
                with self.lock:
                    self.dead_at[victim.pid] = time.monotonic()
                    self.counts["clients killed"] += 1
                self.spawn_client(max(1.0, until - time.monotonic()))
            if rng.random() < 0.08:
                core = rng.choice(self.status()["cores"])
                if core["worker"]["ready"] and core["worker"]["pid"]:
                    try:
                        os.kill(core["worker"]["pid"], signal.SIGKILL)
                        self.counts["workers killed"] += 1
                    except ProcessLookupError:
                        pass

    def fuzzer(self, until: float) -> None:
        from neuron_client import protocol, transport

        rng = random.Random(2)
        while not self.stop.is_set() and time.monotonic() < until:
            endpoint = self.address if rng.random() < 0.5 else \
                f"ipc://{self.directory}/core-{rng.randrange(self.args.cores)}.sock"
            frames = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randint(1, 3))]
            ok = False
            for _ in range(2):  # a second try: under chaos the target may be a worker being restarted
                sock = transport.dealer(endpoint)
                try:
                    sock.send_multipart(frames)
                    if sock.poll(5000):
                        try:
                            ok = isinstance(protocol.decode(sock.recv_multipart()).msg, protocol.Error)
                        except Exception:
                            ok = False
                        break
                finally:
                    sock.close(linger=0)
            self.counts["fuzz cases"] += 1
            if not ok:
                self.counts["fuzz without error reply"] += 1
            time.sleep(0.01)

    def checker(self) -> None:
        from broker.server import process_cpu_seconds

        def live(pid: int) -> bool:  # a killed, not yet reaped client is a zombie: dead, as the broker sees it
            return process_cpu_seconds(pid) is not None

        while not self.stop.wait(0.05):
            try:
                doc = self.status()
            except Exception:
                continue
            self.counts["status reads"] += 1
            now = time.monotonic()
            for core in doc["cores"]:
                owner = core["owner"]
                if owner and not live(owner["pid"]):
                    since = self.dead_at.get(owner["pid"])
                    if since is not None and now - since > 2.0:
                        self.counts["dead owners kept > 2 s"] += 1
                        self.violations.append(f"core {core['core']} still owned by dead pid {owner['pid']}")
            by_core: dict[str, set[int]] = {}
            for path in glob.glob(os.path.join(self.claims, "*-*")):
                pid, core = os.path.basename(path).split("-")
                if live(int(pid)):
                    by_core.setdefault(core, set()).add(int(pid))
            for core, pids in by_core.items():
                if len(pids) > 1:
                    alive = {p for p in pids if live(p)}
                    still = {p for p in alive if os.path.exists(os.path.join(self.claims, f"{p}-{core}"))}
                    if len(still) > 1:
                        self.counts["double claims"] += 1
                        self.violations.append(f"core {core} claimed by live pids {sorted(still)} at once")

    def memory_cycles(self, cycles: int) -> tuple[int, int]:
        """RSS of a worker before and after ``cycles`` load/unload cycles of a 16 MB model (in this process)."""
        import torch

        import neuron_client
        from neuron_client.runtime import Runtime

        path = os.path.join(self.work, "wide.pt")
        torch.jit.save(neuron_client.trace(torch.nn.Linear(2048, 2048), torch.rand(1, 2048)), path)
        os.environ.update(NEURON_BROKER_DIR=self.directory, NEURON_BROKER_AUTOSTART="0")  # this run's broker only
        rt = Runtime(env={"NEURON_RT_VISIBLE_CORES": "0"})
        neuron_client.runtime._runtime = rt
        try:
            def rss():
                time.sleep(0.7)
                return self.status()["cores"][0]["worker"]["rss"]

            for _ in range(3):  # warm the allocator
                neuron_client.jit.load(path).unload()
            def cycle(n: int) -> None:
                for _ in range(n):
                    m = neuron_client.jit.load(path)
                    m(torch.rand(1, 2048))
                    m.unload()

            cycle(cycles // 2)  # the allocator settles during the first half
            before = rss()
            cycle(cycles - cycles // 2)
            return before, rss()
        finally:
            rt.close()
            neuron_client.runtime._runtime = None

    def main(self) -> int:
        import torch

        import neuron_client
        from neuron_client import shm

        class Model(torch.nn.Module):
            def forward(self, x):
                return x * 3 - 1

        self.model = os.path.join(self.work, "model.pt")
        torch.jit.save(neuron_client.trace(Model(), torch.rand(2, 8)), self.model)
        print(f"[chaos] broker with {self.args.cores} cores, {self.args.clients} clients, {self.args.seconds:.0f} s "
              f"(work dir {self.work})", flush=True)
        self.start_broker()
        try:
            until = time.monotonic() + self.args.seconds
            for _ in range(self.args.clients):
                self.spawn_client(self.args.seconds)
            threads = [threading.Thread(target=self.killer, args=(until,), daemon=True),
                       threading.Thread(target=self.fuzzer, args=(until,), daemon=True),
                       threading.Thread(target=self.checker, daemon=True)]
            for t in threads:
                t.start()
            while time.monotonic() < until:
                time.sleep(1)
                print(f"[chaos] {until - time.monotonic():4.0f} s left · {self.counts['clients started']} clients "
                      f"started · {self.counts['clients killed']} killed · {self.counts['workers killed']} workers "
                      f"killed · {self.counts['fuzz cases']} fuzz cases", end="\r", flush=True)
            print()
            with self.lock:
                clients = list(self.clients)
            for p in clients:
                try:
                    p.wait(max(1.0, self.args.seconds * 0.5))
                except subprocess.TimeoutExpired:
                    p.kill()
            self.stop.set()
            for t in threads:
                t.join(10)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(c["owner"] for c in self.status()["cores"]):
                time.sleep(0.1)
            leaked_cores = sum(1 for c in self.status()["cores"] if c["owner"])
            leaked_segments = sum(len(shm.segments_of(pid)) for pid in self.all_pids)
            before, after = self.memory_cycles(self.args.cycles)
        finally:
            self.stop.set()
            self.broker.stop()
        import psutil

        time.sleep(0.5)
        orphans = [pid for pid in self.all_pids if psutil.pid_exists(pid)
                   and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        done = {"cycles": 0, "calls": 0, "conflicts": 0, "errors": 0, "lost": 0}
        for path in glob.glob(os.path.join(self.stats, "*.json")):
            try:
                for k, v in json.load(open(path)).items():
                    done[k] += v
            except (OSError, ValueError):
                pass
        survived = self.counts["clients killed"] + self.counts["workers killed"]
        rows = [
            ("operations: acquire/load/call/release cycles", done["cycles"]),
            ("operations: calls checked against the CPU result", done["calls"]),
            ("conflicts answered (cores busy, expected)", done["conflicts"]),
            ("client-side errors (worker killed under a call, ...)", done["errors"]),
            ("leases lost", done["lost"]),
            ("faults injected: clients kill -9", self.counts["clients killed"]),
            ("faults injected: workers kill -9", self.counts["workers killed"]),
            ("faults survived (broker alive and serving)", survived),
            ("fuzz cases tried", self.counts["fuzz cases"]),
            ("fuzz cases without an error reply", self.counts["fuzz without error reply"]),
            ("status reads by the checker", self.counts["status reads"]),
            ("invariant violations: double claims", self.counts["double claims"]),
            ("invariant violations: dead owners kept > 2 s", self.counts["dead owners kept > 2 s"]),
            ("leaked cores", leaked_cores),
            ("leaked shared-memory segments", leaked_segments),
            ("orphan processes", len(orphans)),
            (f"worker RSS growth over the last {self.args.cycles - self.args.cycles // 2} of {self.args.cycles} "
             "load/unload cycles of a 16 MB model (MiB)",
             round((after - before) / 2**20, 1)),
        ]
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print(f"  {name.ljust(width)}  {value}")
        for v in self.violations[:10]:
            print(f"  violation: {v}")
        bad = (self.counts["double claims"] + self.counts["dead owners kept > 2 s"] + leaked_cores + leaked_segments
               + len(orphans) + self.counts["fuzz without error reply"])
        print(f"[chaos] {'FAILED' if bad else 'OK'}")
        return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--cores", type=int, default=8)
    p.add_argument("--cycles", type=int, default=100, help="load/unload cycles for the memory check")
    p.add_argument("--lease-timeout", type=float, default=10.0,
                   help="heartbeat deadline; dead owners are found by pid at once regardless")
    p.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        model, claims, stats, cores, seconds = args.client
        client_main(model, claims, stats, int(cores), float(seconds))
        return 0
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
