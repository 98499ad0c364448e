"""Many models in one run: the YAML config and the worker processes that run its jobs."""
