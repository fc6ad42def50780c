"""What went wrong, by whose move it is to fix it, and the exit code each kind ends the command with.

0  the job succeeded (or was already complete, or ended partial within its limits)
1  the job ran and failed: more failed shards, or more error rows, than its limits allow
2  bad spec or bad input, found before any work started (nothing was written but the claim on the output)
3  infrastructure: the cluster or the store was unreachable, refused the credentials, or lost the workers
4  an internal error (a bug in bulklabel: please report it with the output of `-v`)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INFRASTRUCTURE = 3
EXIT_INTERNAL = 4


class BadInput(ValueError):
    """The spec or its input cannot work as given; found before any work started."""


class InfrastructureError(RuntimeError):
    """The cluster or the store failed the job (unreachable, lost, out of workers); a re-run may succeed."""


class WorkersLost(InfrastructureError):
    """Workers died more often than the job allows (nodes lost, OOM kills): the cluster, not the input, is at fault."""
