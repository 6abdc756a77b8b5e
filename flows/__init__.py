"""Prefect flows: one per file, each runnable as a plain script."""
