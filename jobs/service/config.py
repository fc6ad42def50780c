"""The job service's configuration: where its state lives and how long idle pools stay warm."""

from __future__ import annotations

from pydantic import Field

from jobs.service.store import default_state_uri
from schemas.specs import Spec, StorageOptions

SERVICE_NAME = "bulklabel-service"
SERVICE_NAMESPACE = "bulklabel"


class ServiceConfig(Spec):
    state_uri: str = Field(default_factory=default_state_uri, description="Job store: a folder or s3:// prefix.")
    storage: StorageOptions = StorageOptions()
    pool_idle_s: float = Field(default=300.0, ge=0, description="An idle warm pool is released after this long.")
    autoscaler: bool = Field(
        default=True,
        description="Nodes may join (KubeRay, `ray up`, or by hand): a job no node can hold waits for one instead of "
        "failing at once.",
    )
