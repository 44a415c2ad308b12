"""The process's side of the runtime: its lease on cores (:mod:`.lease`), its channels to the workers
(:mod:`.channels`), starting a broker when none runs (:mod:`.autostart`), and where models go (:mod:`.placement`)."""
from .._lazy import exports

__getattr__, __dir__ = exports(__name__, {"Runtime": "lease:Runtime", "get_runtime": "lease:get_runtime",
                                          "shutdown": "lease:shutdown"})
