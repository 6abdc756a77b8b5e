"""Scoring what arrives: planning chunks, the ledger of what is scored, compaction, and the watcher."""
