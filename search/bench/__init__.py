"""Benchmarks that print tables: `python -m search.bench NAME [options]`, one module per benchmark."""
