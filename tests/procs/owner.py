"""A long-lived client process that a test drives one command at a time, so that each assertion sits beside its
action: ``python -m tests.procs.owner``, one JSON command per stdin line, one JSON answer per stdout line.

Commands (``{"do": name, ...}``): ``acquire`` (``env``: NEURON_RT_* for the request), ``secrets`` (lease id, token,
cores, workers), ``load`` (``path``) -> model index, ``call`` (``model``, ``shape``, optional ``fill``) -> sum of the
outputs, ``long_call`` (``model``, ``shape``) the same, meant for a slow model, ``release``, ``lost``, ``exit``.
An exception becomes ``{"error": class name, "message": text}``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
import warnings


def main() -> None:
    import torch

    import neuron_client
    from neuron_client.runtime.lease import Runtime

    warnings.simplefilter("ignore")
    rt = None
    models: list = []
    out = sys.stdout
    print(json.dumps({"ready": True, "pid": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        do = cmd["do"]
        try:
            if do == "acquire":
                rt = Runtime(env=cmd.get("env", {}))
                import neuron_client.runtime.lease as runtime_mod

                runtime_mod._runtime = rt  # jit.load places on this runtime
                answer = {"cores": rt.cores}
            elif do == "secrets":
                answer = {"lease_id": rt.lease_id, "token": rt.token, "cores": rt.cores,
                          "workers": {str(k): dataclasses.asdict(v) for k, v in rt.workers.items()}}
            elif do == "load":
                models.append(neuron_client.jit.load(cmd["path"]))
                answer = {"model": len(models) - 1, "cores": models[-1].cores}
            elif do in ("call", "long_call"):
                x = torch.full(cmd["shape"], float(cmd.get("fill", 1.0)))
                y = models[cmd["model"]](x)
                answer = {"sum": float(y.sum())}
            elif do == "release":
                rt.close()
                answer = {"released": True}
            elif do == "lost":
                answer = {"lost": rt.lost}
            elif do == "exit":
                print(json.dumps({"bye": True}), file=out, flush=True)
                os._exit(0)
            else:
                answer = {"error": "UnknownCommand", "message": do}
        except Exception as exc:  # the test asserts on it
            answer = {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()[-2000:]}
        print(json.dumps(answer), file=out, flush=True)


if __name__ == "__main__":
    main()
