"""Serving economics: price tables, GPU occupancy, cost / revenue / margin (docs/economics.md).

The core is pure (no I/O); `files`, `cli`, `text_view`, `json_view` and `charts` are the shell.
"""
