"""Throughput and memory benchmarks (``jrt bench ...``): each prints a table and writes JSON."""
