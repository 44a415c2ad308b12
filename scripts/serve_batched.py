"""An HTTP inference server that owns cores through the broker and serves one model through the request batcher.

    pip install -e '.[serve]'                        # aiohttp (scripts/setup installs it)
    NEURON_RT_NUM_CORES=2 python scripts/serve_batched.py --model model.pt --port 8080 --max-queue-delay-us 1000
    curl -s localhost:8080/infer -d '{"inputs": [[0.1, 0.2, ...]]}'   # rows of the model's one input
    curl -s localhost:8080/stats                       # the batcher's counters (also in neuron-top and the metrics)

The model (a file from ``torch.jit.save(neuron_client.trace(...))`` with one tensor input whose dim 0 is the batch)
gets a replica on every core the process owns; every request is one or more rows, and concurrent requests are
coalesced into one execution on the least-busy replica (``neuron_client.batched``). Without ``--model`` it serves a
small demo MLP (16 -> 4 features, traced with batch 8; ``--demo-seed`` fixes its weights).

``POST /infer`` takes ``{"inputs": rows}`` and answers ``{"outputs": rows}``; a bad request is 400, a full queue 503,
a request that waited past ``--timeout-s`` 504, a failed execution 500, each with ``{"error": type, "message": ...}``.
The first line on stdout, once it serves, is ``serving <model> on http://HOST:PORT (cores [...])``. SIGINT / SIGTERM
stop it: the batcher is closed and the cores released.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()


def save_demo(seed: int, directory: str) -> str:
    import torch

    import neuron_client

    path = os.path.join(directory, "demo_mlp.pt")
    torch.jit.save(neuron_client.trace(demo_model(seed), torch.rand(8, 16)), path)
    return path


STATUS = {"InputShapeError": 400, "QueueFullError": 503, "QueueTimeoutError": 504}


def make_app(served):
    import torch
    from aiohttp import web

    from neuron_client.wire.errors import NeuronRuntimeError

    dtype = torch.float32
    specs = served.model.input_specs
    if specs:
        from neuron_client.wire import tensors

        dtype = tensors.DTYPES.get(specs[0]["dtype"], torch.float32)

    def error(kind: str, message: str, status: int):
        return web.json_response({"error": kind, "message": message}, status=status)

    async def infer(request):
        try:
            body = await request.json()
            x = torch.tensor(body["inputs"], dtype=dtype)
        except (ValueError, KeyError, TypeError) as exc:
            return error("BadRequest", f"expected {{\"inputs\": rows of numbers}}: {exc}", 400)
        try:
            y = await served.acall(x)
        except NeuronRuntimeError as exc:
            kind = type(exc).__name__
            return error(kind, str(exc), STATUS.get(kind, 500))
        return web.json_response({"outputs": y.tolist()})

    async def stats(_request):
        return web.json_response(dataclasses.asdict(served.stats()))

    async def health(_request):
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=16 << 20)
    app.add_routes([web.post("/infer", infer), web.get("/stats", stats), web.get("/healthz", health)])
    return app


async def serve(args) -> None:
    from aiohttp import web

    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    rt = neuron_client.get_runtime()  # owns the cores NEURON_RT_NUM_CORES / NEURON_RT_VISIBLE_CORES name
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or save_demo(args.demo_seed, tmp)
        with neuron_cores_context(start_nc=0, nc_count=rt.num_cores):  # a replica on every core it owns
            model = neuron_client.jit.load(path)
    served = neuron_client.batched(model, max_batch_size=args.max_batch_size,
                                   max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
                                   timeout_s=args.timeout_s)
    runner = web.AppRunner(make_app(served))
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"serving {served.name} on http://{args.host}:{port} (cores {model.cores})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        served.close()
        neuron_client.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a saved model (default: the demo MLP)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: the traced batch size")
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--max-queue-size", type=int, default=1024)
    p.add_argument("--timeout-s", type=float, default=None, help="longest wait in the queue (default: none)")
    p.add_argument("--demo-seed", type=int, default=0)
    args = p.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
