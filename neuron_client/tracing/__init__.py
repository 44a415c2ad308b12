"""Tracing for the cores: :mod:`.trace` (``trace``, ``lazy_load``, ``async_load``, the file's metadata),
:mod:`.bucketing` (one model per input shape) and :mod:`.io_aliases` (state kept on the core between calls)."""
