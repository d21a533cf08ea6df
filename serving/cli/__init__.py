"""The command layer: `xorserve` (main), one module per command, and the flags helper every command uses.

Nothing here is imported by the server, the client, the trainer or the load test, except flags.py, the
stdlib-only leaf that declares every flag with its environment variable.
"""
