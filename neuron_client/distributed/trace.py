"""Tracing, saving and loading tensor-parallel models, as ``neuronx_distributed.trace``.

``parallel_model_trace(get_model, example_inputs, tp_degree=N)`` calls ``get_model()`` once per rank with
``parallel_state`` reporting that rank (the parallel layers build that rank's shard), traces it with
``torch.jit.trace`` (collectives are recorded as ``neuron::all_reduce`` / ``neuron::all_gather`` calls), and returns
one :class:`TensorParallelModel`, loaded onto N contiguous cores at its first call.

A saved model is a directory::

    DIR/tp_0.pt ... DIR/tp_{N-1}.pt     one TorchScript file per rank (loadable with torch.jit.load)
    DIR/weights/shared.pt               with inline_weights_to_neff=False only: the graphs then carry no weights;
    DIR/weights/rank{r}.pt              what is identical on every rank is stored once, in shared.pt

Each rank file records (in its ``neuron_meta``) its rank, the degree, the id of the trace it came from, its input
shapes and, when separated, the name, dtype and shape of every weight it needs, so that a directory with a missing,
stray or mismatched file is refused with a clear error before anything is loaded.
"""
from __future__ import annotations

import io
import os
import re
import time
import uuid

import torch

from neuron_client.runtime import placement
from neuron_client.tracing import bucketing, meta as trace_meta, trace as tracing
from neuron_client.wire.errors import ModelLoadError

from . import weights as wsep
from .model import RankShard, TensorParallelModel
from .parallel_layers import parallel_state

RANK_FILE = re.compile(r"^tp_(.*)\.pt$")
_COMPILER_OPTIONS = ("compiler_args", "compiler_workdir", "max_parallel_compilations", "spmd_mode",
                     "checkpoint_loader_callable", "force_custom_init_on_device", "serialization_path")


def rank_file(rank: int) -> str:
    return f"tp_{rank}.pt"


def _example_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def _model_of(got, rank: int):
    if not (isinstance(got, tuple) and len(got) == 2):
        raise TypeError(f"get_model() must return (model, io_aliases); for rank {rank} it returned "
                        f"{type(got).__name__}")
    model, io_aliases = got
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"get_model() returned a {type(model).__name__} for rank {rank}, not a torch.nn.Module")
    if io_aliases is not None and not isinstance(io_aliases, dict):
        raise TypeError(f"get_model()'s io_aliases must be a dict {{state buffer: output index}}, got "
                        f"{type(io_aliases).__name__}")
    return model, io_aliases or {}


def parallel_model_trace(func, example_inputs, tp_degree: int = 1, inline_weights_to_neff: bool = True,
                         bucket_config=None, **kwargs) -> TensorParallelModel:
    """Trace ``func()``'s model once per rank; returns one callable that runs all ``tp_degree`` ranks.

    ``inline_weights_to_neff=False`` separates the weights from the graphs (see the module docstring).
    Neuron compiler options (``compiler_args``, ``compiler_workdir``, ...) are accepted and ignored; other keyword
    arguments go to ``torch.jit.trace``.
    """
    if not isinstance(tp_degree, int) or isinstance(tp_degree, bool) or tp_degree < 1:
        raise ValueError(f"tp_degree must be an int >= 1, got {tp_degree!r}")
    if bucket_config is not None:
        if inline_weights_to_neff:
            raise ValueError("bucket_config requires inline_weights_to_neff=False (autobucketing needs the weights "
                             "separated from the graphs)")
        if not isinstance(bucket_config, bucketing.BucketModelConfig):
            raise TypeError(f"bucket_config must be a BucketModelConfig, got {type(bucket_config).__name__}")
        if bucket_config.func_kwargs is not None:
            raise ValueError("bucket_config.func_kwargs is not supported with tensor parallelism: get_model() "
                             "builds each rank's model once, for all its buckets")
        if not isinstance(example_inputs, (list, tuple)) or not example_inputs:
            raise ValueError("with bucket_config, example_inputs is a list of one tuple of inputs per bucket")
    trace_kwargs = {k: v for k, v in kwargs.items() if k not in _COMPILER_OPTIONS}
    example = _example_tuple(example_inputs) if bucket_config is None else None
    trace_id = uuid.uuid4().hex
    traced_ranks, per_rank = [], []
    for rank in range(tp_degree):
        with parallel_state.rank_context(rank, tp_degree):
            model, io_aliases = _model_of(func(), rank)
            if bucket_config is None:  # io_aliases: state buffers stay on the rank's core (neuron_client.tracing.io_aliases)
                traced = tracing.trace_graph(model, example, input_output_aliases=io_aliases or None, **trace_kwargs)
            elif io_aliases:
                raise ValueError("io_aliases with bucket_config: give the state as the BucketModelConfig's "
                                 "shared_state_buffer (sliced per bucket by its preprocessor) instead")
            else:  # one packaged model per rank: its buckets' graphs and the kernel (neuron_client.tracing.bucketing)
                traced = bucketing.package_buckets(model, [_example_tuple(e) for e in example_inputs],
                                                      bucket_config, **trace_kwargs)
            del model
        per_rank.append(None if inline_weights_to_neff else wsep.strip(traced))
        traced_ranks.append(traced)
    shared, own = wsep.split_shared(per_rank) if not inline_weights_to_neff else ({}, [None] * tp_degree)
    shards = []
    for rank, traced in enumerate(traced_ranks):
        tp = {"rank": rank, "degree": tp_degree, "trace_id": trace_id, "inline_weights": inline_weights_to_neff}
        if not inline_weights_to_neff:
            tp["weights"] = wsep.manifest(shared, own[rank])
        trace_meta.update_meta(traced, tp=tp)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        ws = None if inline_weights_to_neff else {**shared, **own[rank]}
        shards.append(RankShard(rank=rank, data=data, meta=trace_meta.get_meta(traced), weights=ws))
    model = TensorParallelModel(shards, name=getattr(func, "__name__", "tp_model"))
    model.shared_weights = shared
    return model


def parallel_model_save(model: TensorParallelModel, directory) -> list[str]:
    """Write ``directory/tp_{rank}.pt`` for every rank (and the separated weights); returns the paths written.

    Rank and weight files of an earlier save into the same directory that this model does not have are removed,
    so that the directory always loads as this model.
    """
    if not isinstance(model, TensorParallelModel):
        raise TypeError(f"expected a model from parallel_model_trace or parallel_model_load, got "
                        f"{type(model).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written = []
    for shard in model.shards:
        path = os.path.join(directory, rank_file(shard.rank))
        with open(path, "wb") as f:
            f.write(memoryview(shard.data.numpy()))
        written.append(path)
    keep = {os.path.basename(p) for p in written}
    for name in os.listdir(directory):
        if RANK_FILE.match(name) and name not in keep:
            os.unlink(os.path.join(directory, name))
    wdir = os.path.join(directory, wsep.WEIGHTS_DIR)
    if os.path.isdir(wdir):
        for name in os.listdir(wdir):
            if name == wsep.SHARED_FILE or re.match(r"^rank\d+\.pt$", name):
                os.unlink(os.path.join(wdir, name))
    if not model.inline_weights:
        shared = _shared_of(model)
        own = [{k: v for k, v in s.weights.items() if k not in shared} for s in model.shards]
        written += wsep.save_files(directory, shared, own)
    return written


def _shared_of(model: TensorParallelModel) -> dict:
    shared = model.shared_weights
    if shared is None:
        manifest = model.shards[0].meta["tp"]["weights"]
        shared = {k: model.shards[0].weights[k] for k, v in manifest.items() if v[2] == "shared"}
    return shared


def _fail(directory: str, text: str):
    raise ModelLoadError(f"cannot load the tensor-parallel model in {directory}: {text}")


def read_parallel_model(directory) -> TensorParallelModel:
    """The model saved in ``directory``, checked but not loaded onto cores."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        _fail(directory, "no such directory" if not os.path.exists(directory) else "not a directory")
    files: dict[int, str] = {}
    for name in sorted(os.listdir(directory)):
        m = RANK_FILE.match(name)
        if not m:
            continue
        if not m.group(1).isdigit() or (len(m.group(1)) > 1 and m.group(1).startswith("0")):
            _fail(directory, f"stray file {name}: rank files are named tp_0.pt, tp_1.pt, ...")
        files[int(m.group(1))] = name
    if not files:
        _fail(directory, "it holds no rank files (tp_0.pt, tp_1.pt, ...); save one with parallel_model_save")
    first = min(files)
    blobs = {}
    for rank, name in sorted(files.items()):
        with open(os.path.join(directory, name), "rb") as f:
            blobs[rank] = f.read()
    tp0 = trace_meta.read_meta(blobs[first]).get("tp")
    if not isinstance(tp0, dict) or not isinstance(tp0.get("degree"), int):
        _fail(directory, f"{files[first]} is not a rank file of a tensor-parallel model (no tensor-parallel record)")
    degree, trace_id = tp0["degree"], tp0.get("trace_id")
    stray = sorted(r for r in files if r >= degree)
    if stray:
        _fail(directory, f"stray rank file {', '.join(files[r] for r in stray)}: the model has tp_degree {degree} "
                         f"(ranks 0-{degree - 1}, from {files[first]})")
    missing = [rank_file(r) for r in range(degree) if r not in files]
    if missing:
        _fail(directory, f"missing rank file {', '.join(missing)} of a tp_degree {degree} model")
    shards = {}
    for rank, name in sorted(files.items()):
        meta = trace_meta.read_meta(blobs[rank])
        tp = meta.get("tp")
        if not isinstance(tp, dict) or tp.get("rank") != rank:
            _fail(directory, f"{name} is not rank {rank} of a tensor-parallel model "
                             f"({'it records rank %r' % tp.get('rank') if isinstance(tp, dict) else 'no record'})")
        if tp.get("degree") != degree or tp.get("trace_id") != trace_id:
            _fail(directory, f"{name} comes from a different trace than {files[first]} (tp_degree "
                             f"{tp.get('degree')} vs {degree}); save all ranks of one model together")
        shards[rank] = RankShard(rank=rank, data=torch.frombuffer(bytearray(blobs.pop(rank)), dtype=torch.uint8),
                                 meta=meta)
    inline = {bool(s.meta["tp"].get("inline_weights", True)) for s in shards.values()}
    if len(inline) != 1:
        _fail(directory, "some ranks have their weights inline and some separated")
    if not inline.pop():
        _read_weights(directory, [shards[r] for r in range(degree)])
    return TensorParallelModel([shards[r] for r in range(degree)], name=os.path.basename(os.path.abspath(directory)))


def _read_weights(directory: str, shards: list[RankShard]) -> None:
    wdir = os.path.join(directory, wsep.WEIGHTS_DIR)
    if not os.path.isdir(wdir):
        _fail(directory, f"its ranks' weights are separated but {wsep.WEIGHTS_DIR}/ is missing")
    for name in os.listdir(wdir):
        m = re.match(r"^rank(\d+)\.pt$", name)
        if m and int(m.group(1)) >= len(shards):
            _fail(directory, f"stray weight file {wsep.WEIGHTS_DIR}/{name}: the model has tp_degree {len(shards)}")

    def read(fname: str) -> dict:
        path = os.path.join(wdir, fname)
        if not os.path.isfile(path):
            _fail(directory, f"missing weight file {wsep.WEIGHTS_DIR}/{fname}")
        try:
            return wsep.read_file(path)
        except Exception as exc:
            _fail(directory, f"{wsep.WEIGHTS_DIR}/{fname} is unreadable: {type(exc).__name__}: {exc}")

    shared = read(wsep.SHARED_FILE)
    for shard in shards:
        manifest = shard.meta["tp"].get("weights") or {}
        own = read(wsep.rank_file(shard.rank))
        want_shared = {k: v for k, v in manifest.items() if v[2] == "shared"}
        want_own = {k: v for k, v in manifest.items() if v[2] != "shared"}
        try:
            wsep.check_manifest({k: shared[k] for k in want_shared if k in shared}, want_shared, shard.rank,
                                f"{wsep.WEIGHTS_DIR}/{wsep.SHARED_FILE}")
            wsep.check_manifest(own, want_own, shard.rank, f"{wsep.WEIGHTS_DIR}/{wsep.rank_file(shard.rank)}")
        except ValueError as exc:
            _fail(directory, str(exc))
        shard.weights = {**{k: shared[k] for k in want_shared}, **own}


def parallel_model_load(directory) -> TensorParallelModel:
    """Load a model saved by :func:`parallel_model_save` onto N contiguous cores of this process (the least-used
    run, or from the ``start_nc`` of an enclosing ``neuron_cores_context``)."""
    t0 = time.monotonic()
    model = read_parallel_model(directory)
    model.load(placement.current())
    model.load_s = time.monotonic() - t0
    return model
