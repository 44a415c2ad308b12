import torch
import neuron_client as torch_neuronx
with torch_neuronx.experimental.multicore_context():
    m0 = torch.jit.load('model.pt') # Loads replications to nc0-nc7
example = torch.rand(1, 3, 224, 224)
m0(example) # Executes on nc0
m0(example) # Executes on nc1
