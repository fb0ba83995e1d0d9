"""What sits under the ASGI app: the HTTP protocol's limits, the batch-accepting listener,
the multi-worker supervisor, config reload and the interpreter's GC tuning."""
