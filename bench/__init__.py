"""Benchmark programs (raw in-process pipeline, HTTP load generator) and their result tools.

Run them as modules from the repository root: `python -m bench.raw ...`, `python -m bench.http ...`.
"""
