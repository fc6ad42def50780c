"""Throughput benchmark: bulklabel vs a tuned Ray Data pipeline vs the model's forward-only ceiling.

`python -m bench` (see bench/__main__.py and bench/RESULTS.md).
"""

# Every process of a bench run (the ceiling, the Ray Data reference, the clusters it starts) has the OpenMP wait
# policy bulklabel's workers have (workers/__init__.py): the comparisons are of pipelines, not of libgomp settings.
import workers  # noqa: E402, F401
