"""Models placed on cores: :class:`~.placed.PlacedModel` (the lifecycle they share: load states and their
transitions, per-core tally, finalizer, shape check), :class:`~.neuron_model.NeuronModel` (one model, its replicas) and
:class:`~.data_parallel.DataParallel` (a batch split over cores, :mod:`.batching`), :class:`~.batcher.BatchedModel`
(many callers' requests coalesced into one execution) and :mod:`.awaitable` (``acall`` from asyncio)."""
from .._lazy import exports

__getattr__, __dir__ = exports(__name__, {"NeuronModel": "neuron_model:NeuronModel",
                                          "DataParallel": "data_parallel:DataParallel",
                                          "PlacedModel": "placed:PlacedModel", "LoadState": "placed:LoadState",
                                          "BatchedModel": "batcher:BatchedModel", "batched": "batcher:batched"})
