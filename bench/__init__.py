"""Throughput benchmark: bulklabel vs a tuned Ray Data pipeline vs the model's forward-only ceiling.

`python -m bench` (see bench/__main__.py and bench/RESULTS.md).
"""
