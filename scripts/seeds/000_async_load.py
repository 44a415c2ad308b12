import torch
import neuron_client as torch_neuronx

neuron_model1 = torch_neuronx.trace(model1, inputs1)
torch_neuronx.async_load(neuron_model1)
torch.jit.save(neuron_model1, "my_model1")
neuron_model2 = torch_neuronx.trace(model2, inputs2)
torch_neuronx.async_load(neuron_model2)
torch.jit.save(neuron_model2, "my_model2")

neuron_model1 = torch.jit.load("my_model1") # neuron_model1 will start loading onto the Neuron core immediately, but the load will occur in a separate thread in the background.
neuron_model2 = torch.jit.load("my_model2") # neuron_model2 will start loading onto the Neuron core immediately, but the load will occur in a separate thread in the background.

output1 = neuron_model1(input1) # This call will block until the asynchronous load launched above finishes.
output2 = neuron_model2(input2) # This call will block until the asynchronous load launched above finishes.
