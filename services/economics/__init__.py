"""Serving economics: price tables, GPU occupancy, cost / revenue / margin reports (docs/economics.md).

The core modules are pure (no I/O); `cli`, `files`, `render`, `jsonview` and `charts` are the shell.
"""
