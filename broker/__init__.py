"""The per-host core broker: grants exclusive cores to processes and supervises one worker per core."""
