"""Names of the things the processes share: the Ray namespace, the actors' names, the API's
path. Here alone, so a process that only needs to find the master imports nothing else.
"""

from __future__ import annotations

NAMESPACE = "cicd"
MASTER_NAME = "cicd-master"
API = "/api/v1"  # the HTTP API's path prefix
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a run id as a URL may carry it


def worker_actor_name(worker_id: str) -> str:
    return f"cicd-worker-{worker_id}"
