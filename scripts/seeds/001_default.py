import torch
import neuron_client as torch_neuronx
m0 = torch.jit.load('model.pt') # Loads to nc0
m1 = torch.jit.load('model.pt') # Loads to nc1
