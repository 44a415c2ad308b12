"""``import neuron_client.torch_neuron`` does what ``import torch_neuron`` does for torch-neuron's code: it makes
``torch.neuron`` the runtime's API (``torch.neuron.trace``, ``torch.neuron.DataParallel``), so that code written for
torch-neuron ports by changing that one import line."""
import torch

import neuron_client

torch.neuron = neuron_client
