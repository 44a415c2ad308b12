"""Run neuron_client under Ray: one broker per Ray node, and actors that own exactly the cores Ray gave them.

Ray reserves ``neuron_cores`` logically: it hands each actor whole core ids and sets ``NEURON_RT_VISIBLE_CORES`` as a
comma list (``"0,1"``), but nothing stops another process on the node from using the same cores. Here every actor
acquires its cores from the node's broker, so a second process that tries to take them fails with
:class:`neuron_client.NeuronCoreUnavailableError` naming the actor, and the broker takes a dead actor's cores back
within about a second::

    import ray, neuron_client.integrations.ray as nray

    ray.init()
    nray.ensure_brokers()                       # one broker per node, --cores = the node's neuron_cores

    @ray.remote(resources={"neuron_cores": 2}, num_cpus=0)
    class Server(nray.NeuronActor):
        def __init__(self, model_bytes):
            super().__init__()                  # acquires exactly Ray's cores from the node's broker
            self.model = self.load_model(model_bytes, nc_count=2)   # one replica per owned core
        def __call__(self, x):
            return self.model(x)

``NeuronModelServer`` is such an actor, ready-made; ``neuron_actor(num_cores=k)`` turns a plain class into one.

The broker directory of a node (the first that applies, recorded in Ray's key-value store under the node id so that
every process on the node finds the same one):

1. ``NEURON_BROKER_DIR`` in the node's environment (e.g. ``ray start`` run with it set);
2. ``<base>/node-<node id>`` when a base is given (``ensure_brokers(base_dir=...)`` or ``NEURON_RAY_BROKER_BASE``);
3. ``<host default>-ray/node-<node id>`` when several Ray nodes share this host (a simulated cluster);
4. the host's default broker directory (one Ray node per host: Ray actors and other processes of the host share its
   broker, so they cannot take each other's cores).

This module imports ``ray``; ``import neuron_client`` does not import it.
"""
from __future__ import annotations

import io
import logging
import os
import time
from contextlib import contextmanager

try:
    import ray
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("neuron_client.integrations.ray needs Ray: pip install 'ray[serve]' (or this project's [ray] extra)") from exc

from neuron_client.runtime import autostart
from neuron_client.wire import config
from neuron_client.wire.cores import format_cores, parse_visible_cores
from neuron_client.wire.errors import BrokerUnavailableError, NeuronCoreSpecError, NeuronRuntimeError

log = logging.getLogger("neuron_client.integrations.ray")

RESOURCE = "neuron_cores"  # Ray's resource name for NeuronCores
ENV_VISIBLE = "NEURON_RT_VISIBLE_CORES"
ENV_BROKER_BASE = "NEURON_RAY_BROKER_BASE"
KV_NAMESPACE = "neuron_client"
ENSURE_TIMEOUT_S = 120.0
# How long an actor waits for cores Ray assigned it that the broker still shows held (unless NEURON_RT_ACQUIRE_TIMEOUT
# says otherwise): the previous holder Ray already counts as gone may still be being reclaimed (the broker notices a
# dead owner within ~0.1 s, a silent one within the lease timeout). A process outside Ray holding them fails the
# actor once this has passed.
ATTACH_WAIT_S = 3.0
STATUS_TIMEOUT_S = 30.0


# -- where a node's broker lives ---------------------------------------------------------------------------------
def _kv_key(node_id: str) -> bytes:
    return f"broker_dir:{node_id}".encode()


def _kv_get(node_id: str) -> str | None:
    try:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(_kv_key(node_id), namespace=KV_NAMESPACE)
    except Exception:  # not connected, or a Ray without the store: fall back to the rules
        return None
    return value.decode() if value else None


def _kv_put_first(node_id: str, directory: str) -> str:
    """Record ``directory`` for the node unless one is recorded already; the recorded one."""
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(_kv_key(node_id), directory.encode(), overwrite=False, namespace=KV_NAMESPACE)
    except Exception:
        return directory
    return _kv_get(node_id) or directory


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _node(node_id: str) -> dict:
    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return n
    raise NeuronRuntimeError(f"Ray does not know node {node_id}")


def node_neuron_cores(node_id: str | None = None) -> int:
    """How many ``neuron_cores`` the node advertises to Ray (this process's node by default)."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return int(_node(node_id)["Resources"].get(RESOURCE, 0))


def _shares_host(node_id: str) -> bool:
    """Whether another alive Ray node runs at this node's address (several simulated nodes on one machine)."""
    nodes = _alive_nodes()
    me = next((n for n in nodes if n["NodeID"] == node_id), None)
    if me is None:
        return False
    return any(n["NodeID"] != node_id and n["NodeManagerAddress"] == me["NodeManagerAddress"] for n in nodes)


def node_broker_dir(node_id: str | None = None, base_dir: str | None = None) -> str:
    """The broker directory for a Ray node; call it on that node (its environment is one of the inputs).

    See the module's docstring for the rules; the first answer for a node is recorded in Ray's key-value store, so
    that later calls on the node (actors, ``ensure_brokers`` again) agree even when the cluster has changed since.
    """
    node_id = node_id or ray.get_runtime_context().get_node_id()
    explicit = os.environ.get(config.ENV_BROKER_DIR)
    if explicit:
        return os.path.abspath(explicit)
    recorded = _kv_get(node_id)
    if recorded:
        return recorded
    base = base_dir or os.environ.get(ENV_BROKER_BASE)
    if base:
        directory = os.path.join(os.path.abspath(base), f"node-{node_id[:16]}")
    elif _shares_host(node_id):
        directory = os.path.join(config.broker_dir() + "-ray", f"node-{node_id[:16]}")
    else:
        directory = config.broker_dir()
    return _kv_put_first(node_id, directory)


# -- starting a node's broker ------------------------------------------------------------------------------------
def ensure_local_broker(directory: str, cores: int, timeout_s: float = ENSURE_TIMEOUT_S) -> dict:
    """Find the broker in ``directory`` or start one with ``cores`` cores; runs on the node itself.

    The broker is started by ``python -m broker start`` (which daemonises it and exits), so it is no child of the Ray
    worker: Ray kills a worker's children when the worker exits, and the broker must outlive every actor. Returns
    ``{"directory", "pid", "cores", "backend", "started"}``; raises :class:`BrokerUnavailableError` when the
    broker there has fewer cores than Ray advertises for the node.
    """
    before = autostart.running_pid(directory)
    pong = autostart.ensure_broker(directory, cores=cores, detach=True, autostart=True)
    started = pong.pid != before
    if pong.cores < cores:
        raise BrokerUnavailableError(
            f"the broker in {directory} (pid {pong.pid}) has {pong.cores} cores, but Ray advertises {cores} "
            f"neuron_cores for this node: actors given cores {pong.cores}-{cores - 1} could not take them. Restart it "
            f"with the node's count ('neuron-broker stop --dir {directory}; neuron-broker start --dir {directory} "
            f"--cores {cores}') or advertise {pong.cores} neuron_cores")
    if pong.cores > cores:
        log.warning("the broker in %s has %d cores; Ray advertises only %d neuron_cores for this node (the rest are "
                    "left to processes outside Ray)", directory, pong.cores, cores)
    return {"directory": directory, "pid": pong.pid, "cores": pong.cores, "backend": pong.backend, "started": started}


@ray.remote(num_cpus=0, max_retries=0)
def _ensure_on_node(node_id: str, cores: int, base_dir: str | None, timeout_s: float) -> dict:
    directory = node_broker_dir(node_id, base_dir)
    info = ensure_local_broker(directory, cores, timeout_s)
    return dict(info, node_id=node_id, ray_neuron_cores=cores)


def _pinned(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def ensure_brokers(base_dir: str | None = None, timeout_s: float = ENSURE_TIMEOUT_S) -> list[dict]:
    """Start (or find) the broker of every alive Ray node that advertises ``neuron_cores``; one dict per node.

    One task pinned to each node (``NodeAffinitySchedulingStrategy``, ``num_cpus=0``) finds or starts that node's
    broker with ``--cores`` = the node's ``neuron_cores``. Nodes added later get theirs from their first actor
    (:func:`attach` does the same), or from calling this again; it is idempotent (``started`` says which it started).
    """
    nodes = [n for n in _alive_nodes() if n["Resources"].get(RESOURCE, 0) > 0]
    refs = [_ensure_on_node.options(scheduling_strategy=_pinned(n["NodeID"])).remote(
        n["NodeID"], int(n["Resources"][RESOURCE]), base_dir, timeout_s) for n in nodes]
    infos = ray.get(refs, timeout=timeout_s + 30)
    seen: dict[tuple[str, str], str] = {}
    for n, info in zip(nodes, infos):
        info["address"] = n["NodeManagerAddress"]
        key = (n["NodeManagerAddress"], info["directory"])
        if key in seen:  # only possible when a node's own NEURON_BROKER_DIR points at another node's broker
            raise NeuronRuntimeError(
                f"Ray nodes {seen[key]} and {n['NodeID']} on {key[0]} share the broker in {key[1]}: Ray would give "
                "both nodes' actors the same core ids. Give each node its own NEURON_BROKER_DIR, or unset it and "
                "pass ensure_brokers(base_dir=...)")
        seen[key] = n["NodeID"]
    return infos


@ray.remote(num_cpus=0, max_retries=0)
def _status_on_node(node_id: str):
    from neuron_client.wire.broker_client import BrokerClient

    with BrokerClient(config.broker_address(node_broker_dir(node_id))) as broker:
        if broker.ping() is None:
            return None
        return broker.status()


def node_status(node_id: str, timeout_s: float = STATUS_TIMEOUT_S):
    """The status document of a node's broker (a :class:`~neuron_client.wire.status.StatusDoc`; ``None`` if none
    answers), fetched by a task pinned to the node."""
    return ray.get(_status_on_node.options(scheduling_strategy=_pinned(node_id)).remote(node_id), timeout=timeout_s)


def owners(doc) -> dict[int, int | None]:
    """core -> owner pid (``None`` when free) in a status document."""
    return {c.index: (c.owner.pid if c.owner else None) for c in doc.cores}


def stop_local_brokers(infos, timeout_s: float = 10.0) -> None:
    """Stop brokers of this machine that :func:`ensure_brokers` reported (their workers too); for tests and
    single-machine clusters. Asks each to stop, then kills its process group."""
    from neuron_client.wire.procs import stop_processes

    stop_processes([info["pid"] for info in infos if autostart.running_pid(info["directory"]) == info["pid"]],
                   grace_s=timeout_s, groups=True)  # a broker leads its own session; its workers are in the group


# -- actors ------------------------------------------------------------------------------------------------------
def assigned_cores() -> list[int]:
    """The ``neuron_cores`` ids Ray assigned to this actor or task (empty when it asked for none)."""
    ids = ray.get_runtime_context().get_accelerator_ids().get(RESOURCE, [])
    return sorted(int(i) for i in ids)


def attach(directory: str | None = None):
    """In a Ray actor (or task): acquire exactly the cores Ray assigned, from this node's broker; the
    :class:`neuron_client.runtime.Runtime`.

    Sets ``NEURON_RT_VISIBLE_CORES`` from Ray's assignment when Ray did not (``RAY_EXPERIMENTAL_NOSET_NEURON_RT_VISIBLE_CORES``)
    or set something else, and ``NEURON_BROKER_DIR`` to the node's broker, which it starts if none runs. Raises
    :class:`NeuronCoreSpecError` when the actor asked Ray for no ``neuron_cores``, and
    :class:`neuron_client.NeuronCoreUnavailableError` when another process holds any of the cores (plain Ray would
    let both run) after waiting ``ATTACH_WAIT_S`` (or ``NEURON_RT_ACQUIRE_TIMEOUT``) for them: a holder that Ray
    already counts as gone may still be being reclaimed.
    """
    from neuron_client.runtime import lease as rt_mod

    cores = assigned_cores()
    if not cores:
        raise NeuronCoreSpecError(
            f"this Ray actor was assigned no {RESOURCE}: declare them, e.g. @ray.remote(resources="
            f"{{'{RESOURCE}': 1}}) or .options(resources={{'{RESOURCE}': k}})")
    visible = os.environ.get(ENV_VISIBLE)
    try:
        as_set = parse_visible_cores(visible) if visible else None
    except NeuronCoreSpecError:
        as_set = None
    if as_set != cores:
        if visible:
            log.warning("%s=%r differs from Ray's assignment %s; using Ray's", ENV_VISIBLE, visible, cores)
        os.environ[ENV_VISIBLE] = ",".join(map(str, cores))  # Ray's form: a comma list
    os.environ.pop("NEURON_RT_NUM_CORES", None)
    node_id = ray.get_runtime_context().get_node_id()
    directory = directory or node_broker_dir(node_id)
    os.environ[config.ENV_BROKER_DIR] = directory
    current = rt_mod._runtime
    if current is not None and not current.closed:
        if sorted(current.cores) == cores and current.directory == directory:
            return current
        raise NeuronRuntimeError(
            f"this process already holds {format_cores(current.cores)} from {current.directory}; Ray assigned "
            f"{format_cores(cores)} on {directory}. Call neuron_client.integrations.ray.attach() before any other neuron_client use")
    if not os.environ.get(config.ENV_BROKER_ADDRESS):
        ensure_local_broker(directory, max(node_neuron_cores(node_id), cores[-1] + 1))
    default_wait = config.ENV_ACQUIRE_TIMEOUT not in os.environ
    if default_wait:
        os.environ[config.ENV_ACQUIRE_TIMEOUT] = str(ATTACH_WAIT_S)
    try:
        return rt_mod.get_runtime()
    finally:
        if default_wait:
            os.environ.pop(config.ENV_ACQUIRE_TIMEOUT, None)


@contextmanager
def task_cores():
    """In a Ray task that asked for ``neuron_cores``: hold them (as :func:`attach`) for the ``with`` block and give
    them back at its end, because Ray reuses a task's worker process for other tasks::

        @ray.remote(resources={"neuron_cores": 1}, num_cpus=0)
        def embed(model_bytes, x):
            with nray.task_cores():
                return nray.load(model_bytes)(x)
    """
    from neuron_client.runtime import lease as rt_mod

    rt = attach()
    try:
        yield rt
    finally:
        rt_mod.shutdown()


def load(model, name: str = "model"):
    """``neuron_client.jit.load`` of a path, a file object or a saved model's bytes."""
    from neuron_client import jit

    return jit.load(_read_model(model, name))


def _read_model(model, name: str):
    if isinstance(model, (bytes, bytearray, memoryview)):
        f = io.BytesIO(bytes(model))
        f.name = name
        return f
    return model


class NeuronActor:
    """Base class of a Ray actor that owns the ``neuron_cores`` Ray assigned to it (declare them with
    ``resources={"neuron_cores": k}``). Its ``__init__`` acquires them from the node's broker; subclasses call
    ``super().__init__()`` before loading models."""

    def __init__(self):
        self.neuron_runtime = attach()

    @property
    def neuron_cores(self) -> list[int]:
        return list(self.neuron_runtime.cores)

    def load_model(self, model, name: str = "model", nc_count: int = -1, start_nc: int = -1):
        """Load a saved TorchScript model (a path, a file object or its bytes) onto this actor's cores:
        ``nc_count=-1`` one replica on the least-used core, ``nc_count=k`` replicas on k cores from ``start_nc``
        (0 when not given); calls go round-robin over the replicas."""
        from neuron_client import jit
        from neuron_client.experimental import neuron_cores_context

        if nc_count == -1 and start_nc == -1:
            return jit.load(_read_model(model, name))
        with neuron_cores_context(start_nc=0 if start_nc == -1 else start_nc, nc_count=nc_count):
            return jit.load(_read_model(model, name))

    def neuron_info(self) -> dict:
        """Where this actor runs and what it holds: node id, pid, Ray's ids, the broker's grant, its directory."""
        rt = self.neuron_runtime
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "ray_cores": assigned_cores(), "cores": list(rt.cores), "visible": os.environ.get(ENV_VISIBLE),
                "broker_dir": rt.directory, "lease_id": rt.lease_id}

    def release_cores(self) -> None:
        """Give the cores back now (they are also given back when the actor's process ends)."""
        from neuron_client.runtime import lease as rt_mod

        rt_mod.shutdown()


def neuron_actor(num_cores: int = 1, **ray_options):
    """Decorator: a Ray actor class owning ``num_cores`` NeuronCores (``resources={"neuron_cores": num_cores}``)
    acquired from the node's broker before the class's own ``__init__`` runs. Other keyword arguments go to
    ``ray.remote``. The instance gets ``neuron_runtime``, ``neuron_cores``, ``load_model`` and ``neuron_info``."""
    if int(num_cores) != num_cores or num_cores < 1:
        raise NeuronCoreSpecError(f"num_cores={num_cores!r}: an actor owns a whole number >= 1 of NeuronCores")
    resources = dict(ray_options.pop("resources", None) or {}, **{RESOURCE: int(num_cores)})

    def wrap(cls):
        bases = (cls,) if issubclass(cls, NeuronActor) else (cls, NeuronActor)

        def __init__(self, *args, **kwargs):
            self.neuron_runtime = attach()
            cls.__init__(self, *args, **kwargs)

        actor_cls = type(cls.__name__, bases, {"__init__": __init__, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        return ray.remote(resources=resources, **ray_options)(actor_cls)

    return wrap


class NeuronModelServer(NeuronActor):
    """A ready-made actor: owns its cores, loads a model with one replica per owned core, and serves calls.

        Server = ray.remote(resources={"neuron_cores": 2}, num_cpus=0)(NeuronModelServer)
        s = Server.remote(open("model.pt", "rb").read())
        y = ray.get(s.infer.remote(x))
    """

    def __init__(self, model=None, name: str = "model", replicas: int | None = None):
        super().__init__()
        self.models: dict = {}
        if model is not None:
            self.load(model, name, replicas)

    def load(self, model, name: str = "model", replicas: int | None = None) -> list[int]:
        """Load (or replace) model ``name`` with ``replicas`` replicas (default: one per owned core); its cores."""
        n = replicas or len(self.neuron_runtime.cores)
        self.models[name] = self.load_model(model, name, nc_count=n, start_nc=0)
        return self.models[name].cores

    def infer(self, *args, name: str = "model"):
        return self.models[name](*args)

    def __call__(self, *args):
        return self.infer(*args)

    def run_for(self, seconds: float, *args, name: str = "model", threads: int | None = None) -> dict:
        """Call the model back to back for ``seconds`` from ``threads`` threads (default: one per replica);
        ``{"calls", "seconds"}``. For throughput figures measured inside the actor."""
        import threading

        model = self.models[name]
        threads = threads or len(model.cores)
        counts = [0] * threads
        stop = time.monotonic() + seconds

        def loop(i):
            while time.monotonic() < stop:
                model(*args)
                counts[i] += 1

        t0 = time.monotonic()
        ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return {"calls": sum(counts), "seconds": time.monotonic() - t0}


__all__ = ["RESOURCE", "ENV_BROKER_BASE", "node_broker_dir", "node_neuron_cores", "ensure_local_broker",
           "ensure_brokers", "node_status", "owners", "stop_local_brokers", "assigned_cores", "attach", "NeuronActor",
           "neuron_actor", "NeuronModelServer", "task_cores", "load"]
