"""One module per screen; each owns its query (run in a worker thread) and its widgets."""
