"""Ray actors and what runs inside them: storage access, shard readers, decoding, models, Parquet writers."""

import os

# OpenMP threads that end a parallel region sleep instead of spinning for the next one (libgomp, which torch ships,
# spins by default). A spinning thread takes the core from the worker's decode threads, its other lane and the
# node's other processes: two 2-thread torch processes on 2 cores ran 1.9-2.6x slower spinning (bench.omp_wait).
# libgomp reads it once, when torch loads, so it is set here, before any worker module imports torch; a process
# Ray starts from this one inherits it. A value the user set is kept.
OMP_WAIT_ENV, OMP_WAIT_POLICY = "OMP_WAIT_POLICY", "PASSIVE"
os.environ.setdefault(OMP_WAIT_ENV, OMP_WAIT_POLICY)
