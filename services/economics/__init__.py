"""Serving economics: price tables, GPU occupancy, cost / revenue / margin (docs/economics.md).

Pure functions only: services/cli/economics.py reads the files, prints the views, draws the charts.
"""
