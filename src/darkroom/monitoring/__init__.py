"""Watching the champion on what arrives: drift against its reference, and the images worth a person's labels."""
