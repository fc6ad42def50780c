"""The job service as a Ray actor: detached (it outlives whoever started it), restarted by Ray when its process
dies (it then rebuilds its state from the job store), needing no CPU of its own, and threaded so that `status`
answers while a round of admission runs."""

from __future__ import annotations

import ray

from jobs.service.service import JobService

JobServiceActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=32)(JobService)
