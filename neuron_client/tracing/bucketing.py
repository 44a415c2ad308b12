"""Autobucketing (torch-neuronx's ``BucketModelConfig`` / ``bucket_model_trace``, seed 003).

One packaged TorchScript model holds a traced graph per bucket and the scripted bucket kernel. At each call, inside
the worker, the packaged module's scripted ``forward`` (``run``):

1. calls the kernel on the inputs: ``kernel(List[Tensor]) -> (List[Tensor] padded, Tensor bucket_index)``;
2. checks that the padded inputs have exactly the chosen bucket's shapes (otherwise a ``ValueError`` naming the input
   shapes and the buckets': an input longer than the largest bucket is refused clearly);
3. with a shared state buffer, slices it for the bucket with the preprocessor
   (``(shapes: List[List[List[int]]], states: List[Tensor], bucket_idx: Tensor) -> List[Tensor]``);
4. runs that bucket's graph, writes the aliased outputs into the state slices in place, drops them;
5. trims every output back to the real length along each padded dimension (an output dimension at the same index
   whose size is the bucket's), so that the outputs are those of the unpadded model for the real positions.

Buckets share their weights: the model is built once (``func()``; or once per bucket with ``func_kwargs``, identical
weights then being merged) and traced once per bucket as one method each of one module
(``torch.jit.trace_module``), so every weight is one attribute of the package and ``torch.jit.save`` writes it once;
weight separation (tensor parallelism) sees each weight once too.

The packaged module is called like the model, ``packaged(a, b, c)`` (its ``forward`` takes the traced model's number
of tensors; ``packaged.run([a, b, c])`` is the same), and returns a ``List[Tensor]`` of the outputs flattened;
:class:`neuron_client.NeuronModel` gives them back their structure (recorded in the file's ``neuron_meta``:
``bucketed``, ``buckets``, ``outputs``) and skips the static-shape check.
"""

import hashlib
import inspect
import linecache
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from neuron_client.tracing import io_aliases as state, meta as trace_meta
from neuron_client.wire import tensors

_COMPILER_OPTIONS = ("compiler_workdir", "compiler_args", "inline_weights_to_neff", "partitioner_config")


@dataclass
class BucketModelConfig:
    """How to bucket a model.

    ``bucket_kernel(*bucket_kernel_constant_args)`` returns the ``torch.jit.script`` kernel (a scripted kernel may
    also be given directly). ``shared_state_buffer``: state tensors (a KV cache) kept once for all buckets; each
    bucket's aliased buffers (``func`` returns ``(model, io_aliases)``) are replaced by slices of them, cut by
    ``shared_state_buffer_preprocessor`` (a scripted function, or a factory of one; default: the leading part of
    each state, of the bucket's buffer shape). ``func_kwargs``: one dict per bucket of keyword arguments for ``func``.
    """

    bucket_kernel: Callable
    bucket_kernel_constant_args: tuple = ()
    shared_state_buffer: Optional[List[torch.Tensor]] = None
    shared_state_buffer_preprocessor: Optional[Callable] = None
    func_kwargs: Optional[List[dict]] = None


def default_state_preprocessor(shapes: List[List[List[int]]], states: List[torch.Tensor],
                               bucket_idx: torch.Tensor) -> List[torch.Tensor]:
    """Bucket ``bucket_idx``'s view of each shared state: its leading part, of the bucket's state shape."""
    idx = int(bucket_idx.reshape(-1)[0].item())
    out: List[torch.Tensor] = []
    for j in range(len(states)):
        s = states[j]
        want = shapes[idx][j]
        for d in range(len(want)):
            s = s.narrow(d, 0, want[d])
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: output structure, kernel resolution.


def flatten(obj) -> tuple[list, Any]:
    """The tensors of a nesting of tuples and lists, and its spec (``"t"`` or ``[kind, [specs]]``)."""
    if isinstance(obj, torch.Tensor):
        return [obj], "t"
    if isinstance(obj, (tuple, list)):
        flat, specs = [], []
        for item in obj:
            f, s = flatten(item)
            flat += f
            specs.append(s)
        return flat, ["tuple" if isinstance(obj, tuple) else "list", specs]
    raise ValueError(f"a bucketed model's outputs must be tensors, tuples and lists of them; got "
                     f"{type(obj).__name__}")


def unflatten(flat, spec):
    """The inverse of :func:`flatten`."""
    items = iter(flat)

    def build(s):
        if s == "t":
            return next(items)
        kind, specs = s
        built = [build(x) for x in specs]
        return tuple(built) if kind == "tuple" else built

    out = build(spec)
    rest = sum(1 for _ in items)
    if rest:
        raise ValueError(f"{rest} more outputs than the recorded structure holds")
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _script_error(exc: BaseException) -> str:
    """A TorchScript compile error in one line: what, where, and the offending source line."""
    lines = [line.rstrip() for line in str(exc).splitlines() if line.strip()]
    cut = next((i for i, line in enumerate(lines) if line.strip().startswith('File "')), len(lines))
    what = " ".join(line.strip() for line in lines[:cut] if line.strip() != ":").rstrip(":")
    here = next((i for i, line in enumerate(lines) if "<--- HERE" in line), None)
    where = f" ({lines[cut].strip()}: {lines[here - 1].strip()})" if here and cut < here else ""
    return f"{type(exc).__name__}: {what or 'error'}{where}"


def _script(fn, what: str):
    if isinstance(fn, torch.jit.ScriptFunction):
        return fn
    if not callable(fn):
        raise TypeError(f"the {what} must be a function, got {type(fn).__name__}")
    try:
        return torch.jit.script(fn)
    except Exception as exc:
        raise ValueError(f"the {what} {getattr(fn, '__name__', fn)!r} cannot be compiled with torch.jit.script "
                         f"(it runs inside the packaged model, which must be TorchScript): "
                         f"{_script_error(exc)}") from None


def _check_schema(fn, what: str, args: str, returns: str) -> None:
    schema = fn.schema
    got_args = ", ".join(str(a.type) for a in schema.arguments)
    got_ret = ", ".join(str(r.type) for r in schema.returns)
    if got_args != args or got_ret != returns:
        raise ValueError(f"the {what} must be ({args}) -> {returns}; {fn.name} is ({got_args}) -> {got_ret}")


def resolve_kernel(config: BucketModelConfig):
    """The scripted kernel of ``config``, checked to be ``List[Tensor] -> (List[Tensor], Tensor)``."""
    k = config.bucket_kernel
    if not isinstance(k, torch.jit.ScriptFunction):
        if not callable(k):
            raise TypeError(f"bucket_kernel must be a function returning the scripted kernel, got {type(k).__name__}")
        try:
            k = k(*config.bucket_kernel_constant_args)
        except Exception as exc:
            raise ValueError(f"bucket_kernel(*bucket_kernel_constant_args) raised {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
    elif config.bucket_kernel_constant_args:
        raise ValueError("bucket_kernel_constant_args are for a kernel factory; a scripted kernel takes none")
    k = _script(k, "bucket kernel")
    _check_schema(k, "bucket kernel", "List[Tensor]", "Tuple[List[Tensor], Tensor]")
    return k


def resolve_preprocessor(config: BucketModelConfig):
    p = config.shared_state_buffer_preprocessor
    if p is None:
        p = default_state_preprocessor
    elif not isinstance(p, torch.jit.ScriptFunction) and callable(p):
        try:
            required = [q for q in inspect.signature(p).parameters.values()
                        if q.default is q.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            required = [None]
        if not required:  # a factory, like get_bucket_kernel
            p = p()
    p = _script(p, "shared state buffer preprocessor")
    _check_schema(p, "shared state buffer preprocessor", "List[List[List[int]]], List[Tensor], Tensor",
                  "List[Tensor]")
    return p


_KERNEL_SOURCE = """
def {name}(tensor_list: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    buckets = {buckets}
    n = tensor_list[0].size({dim})
    out: List[torch.Tensor] = []
    for idx in range(len(buckets)):
        b = buckets[idx]
        if n <= b:
            for i in range(len(tensor_list)):
                t = tensor_list[i]
                if i < {padded}:
                    shape = t.shape
                    shape[{dim}] = b - n
                    out.append(torch.cat([t, torch.full(shape, {pad}, dtype=t.dtype, device=t.device)], {dim}))
                else:
                    out.append(t)
            return out, torch.tensor([idx])
    return out, torch.tensor([len(buckets)])
"""


def sequence_length_kernel(buckets, dim: int = 1, padded_inputs: Optional[int] = None, pad_value: int = 0):
    """A scripted kernel like seed 003's: pads the first ``padded_inputs`` inputs (default all) with ``pad_value``
    along ``dim`` to the smallest bucket length that holds input 0's; the other inputs pass unchanged.

    A factory for ``BucketModelConfig(sequence_length_kernel, bucket_kernel_constant_args=((128, 512),))``.
    (TorchScript cannot read a closure's tuple, so the kernel is compiled from source with the lengths in it.)
    """
    buckets = [int(b) for b in buckets]
    if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"bucket lengths must be increasing positive ints, got {buckets}")
    padded = 1 << 30 if padded_inputs is None else int(padded_inputs)
    pad = int(pad_value)
    key = hashlib.sha1(repr((buckets, int(dim), padded, pad)).encode()).hexdigest()[:10]
    name = f"sequence_length_kernel_{key}"
    src = _KERNEL_SOURCE.format(name=name, buckets=buckets, dim=int(dim), padded=padded, pad=pad)
    filename = f"<neuron_client.tracing.bucketing {name}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # torch.jit.script reads source
    scope = {"torch": torch, "List": List, "Tuple": Tuple, "__name__": __name__}
    exec(compile(src, filename, "exec"), scope)
    return torch.jit.script(scope[name])


# ---------------------------------------------------------------------------------------------------------------
# Modules.


class _BucketCall:
    """What is traced for one bucket: the model on a ``List[Tensor]``, outputs flattened into a list.

    With ``states_as_inputs`` the list carries the state slices after the inputs; they stand in for the model's
    state buffers while it runs (so the trace reads them as inputs and keeps no state of its own), and every output
    comes back. Otherwise the model's own aliased buffers (if any) are updated in the graph and their outputs dropped.
    """

    def __init__(self, model, n_inputs: int, aliases: dict, states_as_inputs: bool):
        self.model = model
        self.n = n_inputs
        self.aliases = aliases
        self.slots = state.slots(model, aliases)
        self.states_as_inputs = states_as_inputs
        self.spec = None
        self.alias_flat: list = []

    def __call__(self, inputs: List[torch.Tensor]):
        args, states = inputs[: self.n], inputs[self.n:]
        if self.states_as_inputs:
            for (owner, attr), s in zip(self.slots, states):
                owner._buffers[attr] = s
            try:
                top = self.model(*args)
            finally:
                for owner, attr in self.slots:
                    owner._buffers[attr] = None
            top = state.check_aliased_outputs(top, self.aliases, dict(zip(self.aliases, states)))
            keep = set(self.aliases.values())
            flat, _ = flatten(list(top))
            pos, offsets = 0, []  # flat positions of the aliased (top-level tensor) outputs
            for item in top:
                offsets.append(pos)
                pos += len(flatten(item)[0])
            self.alias_flat = [offsets[i] for i in self.aliases.values()]
            self.spec = flatten(tuple(o for i, o in enumerate(top) if i not in keep))[1]
            return flat
        top = self.model(*args)
        if self.aliases:
            top = state.check_aliased_outputs(top, self.aliases, dict(self.model.named_buffers()))
            for (owner, attr), index in zip(self.slots, self.aliases.values()):
                getattr(owner, attr).copy_(top[index])
            keep = set(self.aliases.values())
            top = tuple(o for i, o in enumerate(top) if i not in keep)
        flat, self.spec = flatten(top)
        return flat


class _Graphs(torch.nn.Module):
    """The module traced once per bucket (``torch.jit.trace_module``: one method ``bucket_i`` each), so that every
    weight is one attribute however many buckets use it."""

    def __init__(self, models: list):
        super().__init__()
        self.models = torch.nn.ModuleList(models)


class BucketedModule(torch.nn.Module):
    """The packaged model (scripted): kernel, dispatch to ``graphs.bucket_i``, state write-back, trimming.

    ``run`` and ``forward`` are defined after scripting (:func:`_define_entry_points`): the dispatch names one
    method per bucket, and ``forward`` takes the traced model's number of tensors.
    """

    __constants__ = ["trim"]
    bucket_shapes: List[List[List[int]]]
    state_shapes: List[List[List[int]]]
    shared_state: List[torch.Tensor]
    alias_flat: List[int]

    def __init__(self, graphs, kernel, bucket_shapes, state_shapes, shared_state, preprocessor, alias_flat, trim):
        super().__init__()
        self.graphs = graphs
        self.kernel = kernel
        self.preprocessor = preprocessor
        self.bucket_shapes = bucket_shapes
        self.state_shapes = state_shapes
        self.shared_state = shared_state
        self.alias_flat = alias_flat
        self.trim = trim

    def _fit(self, inputs: List[torch.Tensor], padded: List[torch.Tensor], idx: int):
        n = len(self.bucket_shapes)
        ok = 0 <= idx < n and len(padded) == len(inputs)
        if ok:
            want = self.bucket_shapes[idx]
            for i in range(len(padded)):
                if padded[i].shape != want[i]:
                    ok = False
        if not ok:
            given: List[List[int]] = []
            for t in inputs:
                given.append(t.shape)
            got: List[List[int]] = []
            for t in padded:
                got.append(t.shape)
            raise ValueError("inputs of shapes {} fit no bucket: the bucket kernel chose bucket {} and gave {} "
                             "input(s) of shapes {}; the buckets take {} (the largest: {})".format(
                                 given, idx, len(padded), got, self.bucket_shapes, self.bucket_shapes[n - 1]))

    @torch.jit.export
    def prepare(self, inputs: List[torch.Tensor]) -> Tuple[int, List[torch.Tensor], List[torch.Tensor],
                                                            List[torch.Tensor]]:
        """(bucket index, the bucket graph's arguments, the padded inputs, the state slices)."""
        padded, idx_t = self.kernel(inputs)
        if idx_t.numel() < 1:
            raise ValueError("the bucket kernel returned an empty bucket index")
        idx = int(idx_t.reshape(-1)[0].item())
        self._fit(inputs, padded, idx)
        states: List[torch.Tensor] = []
        if len(self.shared_state) > 0:
            states = self.preprocessor(self.state_shapes, self.shared_state, idx_t)
        return idx, padded + states, padded, states

    @torch.jit.export
    def finish(self, inputs: List[torch.Tensor], padded: List[torch.Tensor], states: List[torch.Tensor],
               outs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Write the aliased outputs into the state, drop them, trim the rest to the real lengths."""
        if len(self.alias_flat) > 0:
            for j in range(len(self.alias_flat)):
                states[j].copy_(outs[self.alias_flat[j]])
            kept: List[torch.Tensor] = []
            for k in range(len(outs)):
                if k not in self.alias_flat:
                    kept.append(outs[k])
            outs = kept
        if self.trim:
            cuts: List[List[int]] = []  # [dim, real length, bucket length] of each padded dimension
            for i in range(len(inputs)):
                a = inputs[i].shape
                b = padded[i].shape
                if len(a) == len(b):
                    for d in range(len(a)):
                        if a[d] != b[d]:
                            cuts.append([d, a[d], b[d]])
            if len(cuts) > 0:
                trimmed: List[torch.Tensor] = []
                for t in outs:
                    for c in cuts:
                        if t.dim() > c[0] and t.size(c[0]) == c[2]:
                            t = t.narrow(c[0], 0, c[1])
                    trimmed.append(t)
                outs = trimmed
        return outs


def _define_entry_points(scripted, n_buckets: int, n_inputs: int) -> None:
    branches = "".join(f"    {'if' if i == 0 else 'elif'} idx == {i}:\n        outs = self.graphs.bucket_{i}(args)\n"
                       for i in range(n_buckets - 1))
    last = f"        outs = self.graphs.bucket_{n_buckets - 1}(args)\n"
    branches += ("    else:\n" + last) if n_buckets > 1 else last.replace("        ", "    ", 1)
    scripted.define("def run(self, inputs: List[Tensor]) -> List[Tensor]:\n"
                    "    idx, args, padded, states = self.prepare(inputs)\n"
                    + branches +
                    "    return self.finish(inputs, padded, states, outs)\n")
    names = [f"input_{i}" for i in range(n_inputs)]  # forward(a, b, c), like the traced model's
    scripted.define(f"def forward(self, {', '.join(n + ': Tensor' for n in names)}) -> List[Tensor]:\n"
                    f"    return self.run([{', '.join(names)}])\n")


# ---------------------------------------------------------------------------------------------------------------
# Tracing.


def _example_list(example, i: int) -> list:
    if isinstance(example, torch.Tensor):
        return [example]
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return list(example)
    raise TypeError(f"example_inputs[{i}] must be a tensor or a tuple of tensors (bucket {i}'s inputs), got "
                    f"{type(example).__name__}")


def _model_and_aliases(got, i: int):
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.nn.Module):
        model, aliases = got
    else:
        model, aliases = got, {}
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"func must return a torch.nn.Module or (module, io_aliases); for bucket {i} it returned "
                        f"{type(got).__name__}")
    return model.eval(), aliases or {}


def _models(func, n: int, config: BucketModelConfig) -> list:
    kw = config.func_kwargs
    if kw is not None and (not isinstance(kw, (list, tuple)) or len(kw) != n or
                           not all(isinstance(k, dict) for k in kw)):
        raise ValueError(f"func_kwargs must be a list of {n} dicts (one per bucket), got {kw!r}")

    def build(i: int, kwargs: dict):
        if isinstance(func, torch.nn.Module):
            if kwargs:
                raise ValueError("func_kwargs need func to be a function that builds the model")
            return _model_and_aliases(func, i)
        if not callable(func):
            raise TypeError(f"func must be a function returning the model (or the model), got {type(func).__name__}")
        return _model_and_aliases(func(**kwargs), i)

    if kw is None:  # one model for every bucket: its weights are the same attributes in every graph
        built = build(0, {})
        return [built] * n
    return [build(i, k) for i, k in enumerate(kw)]


def _share_weights(module, skip: set) -> int:
    """Make identical weights of different models (``func_kwargs``) one tensor; returns the bytes saved.

    ``skip``: data pointers of state buffers, which are never merged.
    """
    seen: dict = {}
    saved = 0
    for _, sub in module.named_modules():
        for kind in ("parameters", "buffers"):
            for name, t in list(getattr(sub, f"named_{kind}")(recurse=False)):
                if t is None or t.data_ptr() in skip:
                    continue
                key = (t.dtype, tuple(t.shape), t.stride())
                same = next((u for u in seen.get(key, []) if u.data_ptr() == t.data_ptr() or torch.equal(u, t)), None)
                if same is None:
                    seen.setdefault(key, []).append(t)
                elif same.data_ptr() != t.data_ptr():
                    sub._c.setattr(name, same)
                    saved += t.numel() * t.element_size()
    return saved


def bucket_model_trace(func, example_inputs, bucket_config: BucketModelConfig, trim_outputs: bool = True,
                       **kwargs) -> torch.jit.ScriptModule:
    """One model for every bucket of ``example_inputs`` (see :func:`package_buckets`), in the self-placing form of
    :mod:`neuron_client.tracing.script`: ``torch.jit.load`` of its file places it on the loading process's cores."""
    from neuron_client.tracing import script

    packaged = package_buckets(func, example_inputs, bucket_config, trim_outputs, **kwargs)
    meta = trace_meta.get_meta(packaged)
    first = tuple(example_inputs[0]) if isinstance(example_inputs[0], (tuple, list)) else (example_inputs[0],)
    return script.wrap(packaged, first, meta, "bucketed.pt", local=lambda *args: unpack_outputs(packaged(*args), meta))


def package_buckets(func, example_inputs, bucket_config: BucketModelConfig, trim_outputs: bool = True,
                    **kwargs) -> torch.jit.ScriptModule:
    """Trace ``func``'s model once per bucket and package the graphs with the kernel into one TorchScript model.

    ``func``: a function returning the model or ``(model, io_aliases)`` (called once, or once per bucket with
    ``bucket_config.func_kwargs``), or the model itself. ``example_inputs``: one tuple of inputs per bucket, in the
    order of the kernel's bucket indices. Save the result with ``torch.jit.save`` and load it with
    ``neuron_client.jit.load``. Neuron compiler options are accepted and ignored; other keyword arguments go to
    ``torch.jit.trace_module``.
    """
    if not isinstance(bucket_config, BucketModelConfig):
        raise TypeError(f"bucket_config must be a BucketModelConfig, got {type(bucket_config).__name__}")
    if not isinstance(example_inputs, (list, tuple)) or not example_inputs:
        raise ValueError("example_inputs must be a list with one tuple of inputs per bucket")
    trace_kwargs = {k: v for k, v in kwargs.items() if k not in _COMPILER_OPTIONS}
    trace_kwargs.setdefault("strict", False)  # the graphs return lists
    trace_kwargs.setdefault("check_trace", False)
    examples = [_example_list(e, i) for i, e in enumerate(example_inputs)]
    n = len(examples)
    n_inputs = len(examples[0])
    if any(len(e) != n_inputs for e in examples):
        raise ValueError(f"every bucket's example must have the same number of inputs; got "
                         f"{[len(e) for e in examples]}")
    kernel = resolve_kernel(bucket_config)
    for i, ex in enumerate(examples):  # the kernel must send each bucket's example to that bucket, unpadded
        try:
            padded, idx = kernel(ex)
        except Exception as exc:
            raise ValueError(f"the bucket kernel raised on bucket {i}'s example inputs: {_first_line(exc)}") from None
        got = int(idx.reshape(-1)[0]) if idx.numel() else None
        if got != i or [tuple(p.shape) for p in padded] != [tuple(t.shape) for t in ex]:
            raise ValueError(f"the bucket kernel sends bucket {i}'s example inputs (shapes "
                             f"{[list(t.shape) for t in ex]}) to bucket {got} with shapes "
                             f"{[list(p.shape) for p in padded]}; give one example per bucket, at the bucket's "
                             "exact shape, in the kernel's bucket order")
    models = _models(func, n, bucket_config)
    shared = bucket_config.shared_state_buffer
    if shared is not None and (not isinstance(shared, (list, tuple)) or
                               not all(isinstance(t, torch.Tensor) for t in shared)):
        raise TypeError("shared_state_buffer must be a list of tensors")
    shared = [t.detach().clone() for t in shared] if shared else []
    preprocessor = resolve_preprocessor(bucket_config)

    distinct = list({id(m): m for m, _ in models}.values())
    graphs = _Graphs(distinct)
    calls, trace_inputs, state_shapes, state_ptrs = [], {}, [], set()
    emptied, snapshots = [], []  # state buffers taken out while tracing (shared state), and states to put back
    for i, ((model, io_aliases), ex) in enumerate(zip(models, examples)):
        aliases = state.buffer_names(model, io_aliases)
        buffers = dict(model.named_buffers())
        state_ptrs.update(buffers[a].data_ptr() for a in aliases)
        call = _BucketCall(model, n_inputs, aliases, states_as_inputs=bool(shared))
        if shared:
            if len(aliases) != len(shared):
                raise ValueError(f"bucket {i}'s model aliases {len(aliases)} state buffer(s) but shared_state_buffer "
                                 f"holds {len(shared)}; io_aliases lists the buffers in the shared buffer's order")
            shapes = [list(buffers[a].shape) for a in aliases]
            for a, s, whole in zip(aliases, shapes, shared):
                if len(s) != whole.dim() or any(x > y for x, y in zip(s, whole.shape)) \
                        or buffers[a].dtype != whole.dtype:
                    raise ValueError(f"bucket {i}'s state buffer {a!r} ({tensors.dtype_name(buffers[a].dtype)}{s}) "
                                     f"does not fit in the shared state buffer ({tensors.dtype_name(whole.dtype)}"
                                     f"{list(whole.shape)})")
            state_shapes.append(shapes)
            slices = preprocessor([shapes] * n, shared, torch.tensor([i]))
            trace_inputs[f"bucket_{i}"] = ([*ex, *[s.detach().clone() for s in slices]],)
            emptied += [(owner, attr, buffers[a]) for (owner, attr), a in zip(state.slots(model, aliases), aliases)]
        else:
            trace_inputs[f"bucket_{i}"] = (list(ex),)
            snapshots.append(state.Snapshot(model, aliases))
        setattr(graphs, f"bucket_{i}", call)
        calls.append(call)
    try:
        for owner, attr, _ in emptied:  # the trace must not keep a copy of a shared state
            owner._buffers[attr] = None
        with torch.no_grad():
            traced = torch.jit.trace_module(graphs, trace_inputs, **trace_kwargs)
    finally:
        for owner, attr, buf in emptied:
            owner._buffers[attr] = buf
        for snap in snapshots:
            snap.restore()
        for i in range(n):
            graphs.__dict__.pop(f"bucket_{i}", None)
    specs = [c.spec for c in calls]
    if any(s != specs[0] for s in specs):
        raise ValueError(f"the buckets' outputs differ in structure: {specs}")
    alias_flat = calls[0].alias_flat
    if any(c.alias_flat != alias_flat for c in calls):
        raise ValueError("every bucket must put its state outputs at the same positions")
    saved_bytes = _share_weights(traced, state_ptrs) if len(distinct) > 1 else 0
    package = BucketedModule(traced, kernel, [[list(t.shape) for t in ex] for ex in examples], state_shapes,
                             shared, preprocessor, alias_flat, bool(trim_outputs))
    try:
        scripted = torch.jit.script(package)
        _define_entry_points(scripted, n, n_inputs)
    except Exception as exc:
        raise ValueError(f"the buckets could not be packaged into one TorchScript model: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None
    meta = {"format": trace_meta.META_FORMAT, "lazy_load": False, "async_load": False, "bucketed": True,
            "buckets": [[{"shape": list(t.shape), "dtype": tensors.dtype_name(t.dtype)} for t in ex]
                        for ex in examples],
            "outputs": specs[0], "trim_outputs": bool(trim_outputs), "deduplicated_weight_bytes": saved_bytes}
    if shared:
        meta["shared_state"] = [{"shape": list(t.shape), "dtype": tensors.dtype_name(t.dtype)} for t in shared]
        meta["io_aliases"] = {f"shared_state[{j}]": k for j, k in enumerate(alias_flat)}
    trace_meta.set_meta(scripted, meta)
    return scripted


def is_bucketed(meta: dict) -> bool:
    return bool(meta.get("bucketed"))


def unpack_outputs(outputs, meta: dict):
    """The packaged module's flat output list with the traced model's output structure back."""
    spec = meta.get("outputs")
    if spec is None or not isinstance(outputs, list):
        return outputs
    return unflatten(outputs, spec)
