"""The one harness of the test processes: ``python -m tests.procs.<name>`` is a long-lived client that a test drives
one command at a time, so that each assertion sits beside its action in the test function.

Protocol: one JSON command per stdin line, ``{"do": name, "id": n, **arguments}``; one JSON reply per stdout line,
written when the command is done, carrying the command's ``id``. The first line the process writes is
``{"ready": true, "pid": ...}``. A command that raises does not end the process: its reply is :func:`error_doc`
(``{"error": class name, "message": ..., "types": [the class and its bases], "trace": ...}``). Warnings a command
raises come back in its reply as ``"warnings"``. Stray prints go to stderr, never among the replies. The process
ends at the ``exit`` command or when stdin closes (the test process went away).

A command set is a module of this package that registers its commands with :func:`command` and ends with
``if __name__ == "__main__": harness.serve()``; it may import another set to offer its commands too
(:mod:`tests.procs.owner` holds those of every process that owns cores). Objects a command creates (models, ...)
are kept under integer handles (:func:`keep`, :func:`get`) that later commands name. ``reset`` runs every hook
registered with :func:`on_reset` (release the cores, drop the kept objects): a fixture resets a process between
tests to reuse it.

Arguments that stand for tensors are written as :func:`value` reads them, e.g. ``{"rand": [2, 4]}`` or
``{"tensor": [[0, 1]], "dtype": "int64"}``.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import traceback
import warnings

COMMANDS: dict = {}
_objects: dict[int, object] = {}
_next_handle = [0]
_reset_hooks: list = []


def command(fn=None, *, name: str | None = None):
    """Register ``fn(**arguments) -> dict | None`` as the command ``name`` (default: the function's name)."""
    def register(f):
        COMMANDS[name or f.__name__] = f
        return f

    return register(fn) if fn is not None else register


def on_reset(fn):
    """Run ``fn()`` at each ``reset`` (latest registered first)."""
    _reset_hooks.insert(0, fn)
    return fn


def keep(obj) -> int:
    """A handle for ``obj`` that later commands can name."""
    _next_handle[0] += 1
    _objects[_next_handle[0]] = obj
    return _next_handle[0]


def get(handle: int):
    try:
        return _objects[int(handle)]
    except KeyError:
        raise KeyError(f"no object kept under handle {handle}") from None


def drop(handle: int) -> None:
    _objects.pop(int(handle), None)


def error_doc(exc: BaseException) -> dict:
    """How an exception travels back to the test."""
    return {"error": type(exc).__name__, "message": str(exc), "types": [c.__name__ for c in type(exc).__mro__],
            "trace": "".join(traceback.format_exception(exc))[-3000:]}


# -- arguments and results -------------------------------------------------------------------------------------------

_TENSOR_KEYS = ("rand", "zeros", "ones", "full", "arange", "tensor")


def value(spec):
    """A command argument with the tensors it describes made: ``{"rand": shape}`` (``"seed"``: the same values each
    time), ``{"zeros": shape}``,
    ``{"ones": shape}``, ``{"full": shape, "fill": v}``, ``{"arange": n}`` and ``{"tensor": nested list}``, each with
    an optional ``"dtype"`` (a torch dtype's name); ``{"tuple": [...]}`` is a tuple; other lists and dicts are
    walked."""
    if isinstance(spec, dict):
        kind = next((k for k in _TENSOR_KEYS if k in spec), None)
        if kind is not None:
            import torch

            dtype = getattr(torch, spec["dtype"]) if "dtype" in spec else None
            arg = spec[kind]
            if kind == "rand":
                gen = torch.Generator().manual_seed(int(spec["seed"])) if "seed" in spec else None
                return torch.rand(arg, dtype=dtype, generator=gen)
            if kind == "zeros":
                return torch.zeros(arg, dtype=dtype)
            if kind == "ones":
                return torch.ones(arg, dtype=dtype)
            if kind == "full":
                return torch.full(arg, float(spec.get("fill", 1.0)), dtype=dtype)
            if kind == "arange":
                return torch.arange(arg, dtype=dtype)
            return torch.tensor(arg, dtype=dtype)
        if "tuple" in spec and len(spec) == 1:
            return tuple(value(v) for v in spec["tuple"])
        return {k: value(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [value(v) for v in spec]
    return spec


def close(a, b, atol: float = 1e-6) -> bool:
    """``a`` and ``b`` have the same structure (tuple, list, dict with the same keys in order), and their tensors the
    same shape, dtype and values (within ``atol``)."""
    import torch

    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.allclose(a.float(), b.float(), atol=atol)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(close(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(close(x, y, atol) for x, y in zip(a, b))
    return a == b


def kinds(out):
    """The structure of an output: ``"tensor"``, or the container's type name with its items' kinds."""
    import torch

    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, dict):
        return {"dict": {k: kinds(v) for k, v in out.items()}}
    if isinstance(out, (list, tuple)):
        return {type(out).__name__: [kinds(v) for v in out]}
    return type(out).__name__


# -- the loop --------------------------------------------------------------------------------------------------------


@command
def reset() -> dict:
    """Undo what earlier commands did (every on_reset hook), so that the next test finds the process as new."""
    errors = []
    for hook in list(_reset_hooks):
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - the remaining hooks still run; the test sees the first error
            errors.append(exc)
    _objects.clear()
    gc.collect()
    if errors:
        raise errors[0]
    return {"reset": True}


@command
def ping() -> dict:
    return {"pid": os.getpid()}


@command
def whoami(var: str = "") -> dict:
    """What makes this process itself: pid, session, working directory, ``sys.path[0]``, an environment variable,
    and a draw of torch's and Python's random generators."""
    import random

    import torch

    return {"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "path0": sys.path[0],
            "var": os.environ.get(var), "torch_rand": float(torch.rand(1)), "rand": random.random()}


def _answer(out, doc: dict) -> None:
    try:
        line = json.dumps(doc)
    except (TypeError, ValueError) as exc:
        line = json.dumps(error_doc(TypeError(f"the reply could not be written as JSON: {exc}")))
    out.write(line + "\n")
    out.flush()


def serve() -> None:
    """Answer commands from stdin until ``exit`` or the end of stdin."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (libraries, models) never mix with replies
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    _answer(out, {"ready": True, "pid": os.getpid()})
    while True:
        line = sys.stdin.readline()
        if not line:
            os._exit(0)  # the test process closed our stdin: nobody is listening any more
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            name = cmd.pop("do")
            cmd_id = cmd.pop("id", None)
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            _answer(out, error_doc(ValueError(f"not a command: {line.strip()[:200]} ({exc})")))
            continue
        if name == "exit":
            _answer(out, {"bye": True, "id": cmd_id})
            os._exit(0)
        fn = COMMANDS.get(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if fn is None:
                    raise KeyError(f"unknown command {name!r}; this process knows {sorted(COMMANDS)}")
                doc = dict(fn(**cmd) or {})
            except Exception as exc:  # noqa: BLE001 - the test asserts on it; the process carries on
                doc = error_doc(exc)
        if caught:
            doc.setdefault("warnings", [str(w.message) for w in caught])
        if cmd_id is not None:
            doc["id"] = cmd_id
        _answer(out, doc)
