"""Training a candidate: one entry per fold's run, the loop and its parts below it, then the candidate's files."""
