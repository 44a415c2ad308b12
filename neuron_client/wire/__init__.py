"""The wire kernel: what the broker, the workers, the client and the operator commands share.

- :mod:`.messages`: every message type (dataclasses); :mod:`.codec`: how they travel (msgpack header + frames);
  :mod:`.tensors`: tensors' bytes on the wire (the only module here that imports torch, loaded by the codec the first
  time a tensor travels);
- :mod:`.errors`: the error types and their wire codes; :mod:`.comm`: ZeroMQ sockets and request channels;
  :mod:`.broker_client`: every request of the broker's operator socket (ping, status, stop, drain, release);
  :mod:`.lease_link`: the lease link (AF_UNIX, the owner's kernel credentials); :mod:`.shm`: shared-memory segments;
- :mod:`.config`: environment variables, paths and defaults; :mod:`.cores`: core specs (``NEURON_RT_*``);
  :mod:`.procs`: process liveness and stopping; :mod:`.status`: the status document's records.

Nothing here imports anything above it (the runtime, models, tracing): ``python -c "import neuron_client.wire.comm"``
loads neither torch nor the client.
"""
