"""The fine-tune's worker side as the driver sees it: torch-free fronts of what runs in Ray's processes.

The driver (jobs/finetune.py, also imported by the job service) hands Ray an actor class and Ray Train a loop
function; naming workers.finetune.embed or .loop there would load torch (~900 MB, seconds) in the driver. These
fronts import them inside, in the actor's or the Train worker's own process (as workers/label/remote.py does for the
label worker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.finetune import FinetuneJobSpec


class EmbeddingActor:
    """The Ray actor around workers.finetune.embed.EmbeddingPass: one pass over the images with the frozen base."""

    def __init__(self, spec: FinetuneJobSpec, threads: int, log_level: int, cache: bool = False):
        from workers.finetune.embed import EmbeddingPass  # torch loads here, in the actor
        from workers.finetune.loop import _configure_logging

        _configure_logging(log_level)
        # A constructor's exception reaches the driver only as the text of Ray's ActorDiedError; raised by the first
        # call instead, it arrives as itself (a WeightsError: exit 2, one line naming the missing file).
        self.impl, self.failed = None, None
        try:
            self.impl = EmbeddingPass(spec, threads, cache)
        except Exception as exc:  # noqa: BLE001 - kept whole and raised by the first call
            self.failed = exc

    def call(self, method: str, *args):
        if self.failed is not None:
            if method == "close":  # nothing was opened
                return None
            raise self.failed
        return getattr(self.impl, method)(*args)


def train_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker` (workers.finetune.loop.train_loop), imported in the Train worker."""
    from workers.finetune.loop import train_loop as run  # torch loads here, in the Train worker

    run(config)
