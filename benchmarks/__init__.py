"""The benchmark suite of the runtime: ``scripts/bench`` runs it, :mod:`benchmarks.harness` drives it.

Every figure is a ratio to a baseline measured in the same run, with the variants interleaved in rounds so that
machine noise hits them alike. One module per section; each has ``run(ctx) -> harness.SectionResult``.

This package imports nothing heavy at import time: the echo servers of :mod:`benchmarks.echo` and the in-process
ceilings of :mod:`benchmarks.scaling` run in processes started with multiprocessing's ``spawn`` method, which imports
this package again in the child.
"""

# name -> (module, one-line description); the order is the order of a full run (and of the report's sections).
SECTIONS = {
    "dispatch": ("benchmarks.dispatch",
                 "round trip of a call through neuron_client vs bare pyzmq, a Unix socket, in-process and Ray; "
                 "large tensors through shared memory vs the socket; the shared-memory threshold"),
    "e2e": ("benchmarks.e2e",
            "all-MiniLM-L6-v2 embedding batches of 8: neuron_client vs in-process (same CPU and threads) vs a Ray "
            "actor"),
    "scaling": ("benchmarks.scaling",
                "throughput of replicas and DataParallel over 1, 2, 4 cores vs 1 core and vs the hardware's own "
                "scaling; open-loop Poisson load at rising rates until p99 breaks"),
    "placement": ("benchmarks.placement",
                  "threads over replicated cores vs one core; async_load vs sequential loads, lazy jit.load; "
                  "seed 004's LSTM ensemble with fork/wait and spread over cores"),
    "control": ("benchmarks.control",
                "acquire+release per second vs a bare ping to the broker; time from kill -9 of an owner to its "
                "cores being free"),
    "jitload": ("benchmarks.jitload",
                "plain torch.jit.load of the self-placing saved form vs neuron_client.jit.load: load time, and the "
                "per-call cost of its TorchScript forward vs the NeuronModel it wraps"),
    "coldstart": ("benchmarks.coldstart",
                  "cold start of neuron-ls, neuron-broker status, --help vs python -c pass; peak RSS; what the broker "
                  "process imports"),
    "batcher": ("benchmarks.batcher",
                "32 callers of batch-1 requests to one model on 1 and 2 cores: no batcher vs neuron_client.batched at "
                "delays 0, 100 us, 1 ms, 5 ms vs in-process batches; throughput, p50/p99"),
    "loading": ("benchmarks.loading",
                "tensor-parallel MiniLM (TP=2): weights separated from the graphs vs inlined: bytes on disk, load "
                "time"),
}
