"""The label worker as the driver sees it: a torch-free front that Ray makes into an actor.

`ray.remote(LabelWorker)` would import workers.label.label_worker, and with it torch and torchvision (~900 MB, seconds),
in
every process that creates workers: the CLI, the job service. This front imports the real worker inside the actor's
own process, where the model lives anyway.
"""

from __future__ import annotations

from schemas.shards import ShardJob, ShardResult, ShardTask, WorkerSpec


class LabelWorkerActor:
    """One model replica (workers.label.label_worker.LabelWorker) inside a Ray actor."""

    def __init__(self, spec: WorkerSpec, torch_threads: int):
        from workers.label.label_worker import LabelWorker  # torch loads here, in the actor, never in the driver

        self._worker = LabelWorker(spec, torch_threads)

    def describe(self) -> dict:
        return self._worker.describe()

    async def label_shard(self, task: ShardTask, attempt: int, job: ShardJob) -> ShardResult:
        return await self._worker.label_shard(task, attempt, job)
