"""The README's "Using it" example, complete: ``NEURON_RT_VISIBLE_CORES=4-5 python examples/app.py`` with a broker
of at least 6 cores (``neuron-broker start --cores 8``). It writes ``model.pt`` into the current directory.

The block between the two ``# --`` lines is the README's (tests/integration/test_readme.py checks that it is there
verbatim); what comes before defines what the README leaves to its reader (a model and an example input), what comes
after uses the other helpers it imports and checks what its comments say.
"""
# isort: skip_file
# (the README's block imports where a reader meets the names; sorting would break the excerpt)
import os

import torch

from neuron_client.examples import models

model = models.resnet50().eval()                   # a small CNN for [N, 3, 224, 224] images (offline stand-in)
example = torch.rand(1, 3, 224, 224)

# -- the README's block
import torch, neuron_client

traced = neuron_client.trace(model, example)       # TorchScript trace; input shapes recorded in the saved file
torch.jit.save(traced, "model.pt")
m0 = neuron_client.jit.load("model.pt")            # lands on the process's nc0 (global core 4 above)
m1 = neuron_client.jit.load("model.pt")            # nc1 (global core 5)
y = m0(example)                                    # runs in core 4's worker process, returns a torch tensor
m0.cores                                           # [4]: global ids of the cores holding its replicas

from neuron_client.experimental import neuron_cores_context, multicore_context, set_neuron_cores, set_multicore
with neuron_cores_context(start_nc=0, nc_count=2):  # per thread, unlike the reference
    m2 = neuron_client.jit.load("model.pt")        # replicas on nc0 and nc1; calls go round-robin
fut = m2.submit(example)                           # a concurrent.futures.Future: keep several cores busy
y2 = fut.result(timeout=60)                        # its result, once a worker has it
m2(example)                                        # a call from this thread
m2.last_core                                       # the global core that served this thread's last call (4 or 5)
# --

set_neuron_cores(m1, start_nc=0, nc_count=1)       # re-placed: unloaded from nc1, loaded on nc0
with multicore_context():                          # replicated on every core the process owns
    m3 = neuron_client.jit.load("model.pt")
set_multicore(m0)                                  # the same for a loaded model
assert all(torch.allclose(m(example), y, atol=1e-5) for m in (m0, m1, m3))
if os.environ.get("NEURON_RT_VISIBLE_CORES") == "4-5":  # what the comments say of cores 4 and 5
    assert m1.cores == [4] and sorted(m3.cores) == sorted(m0.cores) == sorted(m2.cores) == [4, 5], \
        (m0.cores, m1.cores, m2.cores, m3.cores)
    assert m2.last_core in (4, 5), m2.last_core
assert torch.allclose(y, model(example), atol=1e-5) and torch.allclose(y2, y, atol=1e-5)
print(f"app.py: m0 on {m0.cores}, m1 on {m1.cores}, m2 on {m2.cores}, m3 on {m3.cores}; m2's last call ran on core "
      f"{m2.last_core}")
