"""The ``darkroom`` command line: commands, flags made from the configs, the demo, the temporary server, serve."""
