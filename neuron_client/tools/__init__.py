"""Command-line tools of the client side: :mod:`.launch` (``neuron-run``)."""
