import torch
import neuron_client as torch_neuronx

neuron_model = torch_neuronx.trace(model, inputs)
torch_neuronx.lazy_load(neuron_model)
torch.jit.save(neuron_model, "my_model")

neuron_model = torch.jit.load("my_model") # neuron_model will not be loaded onto the Neuron core until it is run or it is passed to DataParallel
