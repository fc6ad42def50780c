"""What went wrong, by whose move it is to fix it, and the exit code each kind ends the command with.

0  the job succeeded (or was already complete, or ended partial within its limits)
1  the job ran and failed: more failed shards, or more error rows, than its limits allow
2  bad spec or bad input, found before any work started (nothing was written but the claim on the output)
3  infrastructure: the cluster or the store was unreachable, refused the credentials, or lost the workers
4  an internal error (a bug in bulklabel: please report it with the output of `-v`)
"""

from __future__ import annotations

from schemas.errors import BadInput as BadInput  # raised by schemas' validation too, so it lives there

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INFRASTRUCTURE = 3
EXIT_INTERNAL = 4


class InfrastructureError(RuntimeError):
    """The cluster or the store failed the job (unreachable, lost, out of workers); a re-run may succeed."""


class WorkersLost(InfrastructureError):
    """Workers died more often than the job allows (nodes lost, OOM kills): the cluster, not the input, is at fault."""


# Error classes of modules the driver must not import just to classify an error (jobs.label.runner, jobs.finetune:
# torch and Ray), matched by their qualified name anywhere in the exception's class hierarchy.
_BY_NAME = {
    "jobs.label.runner.JobFailed": EXIT_FAILED,
    "jobs.finetune.FinetuneFailed": EXIT_FAILED,
    "jobs.finetune.ResumeConflict": EXIT_BAD_INPUT,
    "workers.weights.WeightsError": EXIT_BAD_INPUT,  # weights not found, hash mismatch, unsafe file
    "workers.ship.export.ExportRefused": EXIT_BAD_INPUT,  # no sample to check on, or a failed parity check
    "workers.io.storage.StoreUnavailable": EXIT_INFRASTRUCTURE,
    "workers.io.storage.AccessDenied": EXIT_INFRASTRUCTURE,
    "workers.io.storage.StorageError": EXIT_BAD_INPUT,  # no bucket, bad scheme, unwritable output, missing input
    "pydantic_core._pydantic_core.ValidationError": EXIT_BAD_INPUT,
    "yaml.error.YAMLError": EXIT_BAD_INPUT,
}
_OUR_PACKAGES = ("jobs.", "workers.", "schemas.")
# A path the user named that is not there or not theirs: their move. Other OS errors (a full disk, I/O errors) are
# the machine's.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def exit_code_for(exc: BaseException) -> int:
    """The exit code the command ends with when `exc` stops it (see the module docstring)."""
    for cls in type(exc).__mro__:  # most specific class first: StoreUnavailable before StorageError
        code = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    if isinstance(exc, BadInput):
        return EXIT_BAD_INPUT
    if isinstance(exc, InfrastructureError):
        return EXIT_INFRASTRUCTURE
    if _is_ray_error(exc):
        # A task's exception re-raised by ray.get: classify what the task raised (a bug there is still a bug).
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and type(cause).__name__ != "RayTaskError":
            return exit_code_for(cause)
        return EXIT_INTERNAL if type(exc).__name__ == "RayTaskError" else EXIT_INFRASTRUCTURE
    if isinstance(exc, ConnectionError | TimeoutError):  # ray.init cannot reach $RAY_ADDRESS
        return EXIT_INFRASTRUCTURE
    if isinstance(exc, ValueError) and type(exc).__module__.startswith(_OUR_PACKAGES):
        return EXIT_BAD_INPUT  # ModelError, ArtifactError, FinetuneDataError, PlanError, PlacementError, ...
    if isinstance(exc, _USER_OS_ERRORS):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return EXIT_INFRASTRUCTURE
    return EXIT_INTERNAL


def _is_ray_error(exc: BaseException) -> bool:
    return any(c.__module__ == "ray.exceptions" and c.__name__ == "RayError" for c in type(exc).__mro__)
