"""Which version is live: the champion pointer and its history, the promotion gate, data changes between versions."""
