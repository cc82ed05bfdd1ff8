"""The embedded local stack behind `stamp stack up|down|status`: SeaweedFS (S3), an MLflow server, a Ray head.

``ModelServer`` runs `mlflow models serve` for one registered model (not part of `stack up`).

``services`` holds one class per service (start, health check, stop by ownership record),
``stack`` composes them under one state directory, ``procs`` is the process plumbing (spawn with
a marker, ownership records, stop by pid, free ports) that both use and the tests reuse.
``init_ray`` attaches a job to a cluster, or starts a private local Ray bound to 127.0.0.1.
"""

from pipeline.stack import procs
from pipeline.stack.local_ray import init_ray
from pipeline.stack.services import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_RAY_DASHBOARD_PORT,
    DEFAULT_RAY_PORT,
    DEFAULT_S3_PORT,
    LOOPBACK,
    SEAWEED_GRPC_OFFSET,
    MlflowServer,
    ModelServer,
    Progress,
    RayHead,
    S3Credentials,
    SeaweedFS,
    SeaweedPorts,
    Service,
    StackError,
)
from pipeline.stack.stack import (
    ServiceInfo,
    ServiceStatus,
    StackConfig,
    StackInfo,
    StackPaths,
    StackStatus,
    stack_down,
    stack_status,
    stack_up,
)

__all__ = [
    "procs", "init_ray",
    "DEFAULT_MLFLOW_PORT", "DEFAULT_RAY_DASHBOARD_PORT", "DEFAULT_RAY_PORT", "DEFAULT_S3_PORT", "LOOPBACK",
    "SEAWEED_GRPC_OFFSET", "MlflowServer", "ModelServer", "Progress", "RayHead", "S3Credentials", "SeaweedFS", "SeaweedPorts",
    "Service", "StackError",
    "ServiceInfo", "ServiceStatus", "StackConfig", "StackInfo", "StackPaths", "StackStatus", "stack_down",
    "stack_status", "stack_up",
]
