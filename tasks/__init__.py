"""Prefect tasks: thin wrappers over darkroom's core with retries, names and logging."""
