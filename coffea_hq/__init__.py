"""coffea-hq: a pull-based distributed task queue for coffea analyses.

>>> from coffea_hq import LocalCluster, Client
>>> with LocalCluster(workers=2) as cluster:
...     Client(cluster.url).map(pow, range(4), [2] * 4).result()
[0, 1, 4, 9]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use, so that `coffea_hq.server` and `coffea_hq.worker`, which
# import only `coffea_hq.protocol`, never load the client (PEP 562).
_LAZY = {
    "Client": "coffea_hq.client",
    "Job": "coffea_hq.client",
    "LocalCluster": "coffea_hq.local",
    "HQError": "coffea_hq.errors",
    "TaskFailed": "coffea_hq.errors",
    "JobCancelled": "coffea_hq.errors",
    "WorkerLost": "coffea_hq.errors",
    "TLSError": "coffea_hq.errors",
    "HQExecutor": "coffea_hq.executor",
    "Environment": "coffea_hq.environments",
    "EnvironmentFailed": "coffea_hq.errors",
    "Scheduler": "coffea_hq.dask",
    "get": "coffea_hq.dask",
}

__all__ = [
    "Client",
    "Environment",
    "EnvironmentFailed",
    "HQError",
    "HQExecutor",
    "Job",
    "JobCancelled",
    "LocalCluster",
    "Scheduler",
    "TLSError",
    "TaskFailed",
    "WorkerLost",
    "get",
]

if TYPE_CHECKING:
    from coffea_hq.client import Client, Job
    from coffea_hq.dask import Scheduler, get
    from coffea_hq.environments import Environment
    from coffea_hq.errors import (
        EnvironmentFailed,
        HQError,
        JobCancelled,
        TaskFailed,
        TLSError,
        WorkerLost,
    )
    from coffea_hq.executor import HQExecutor
    from coffea_hq.local import LocalCluster


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'coffea_hq' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
