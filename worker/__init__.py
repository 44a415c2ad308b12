"""Worker processes: one per core, pinned to that core's compute, holding and running models."""
