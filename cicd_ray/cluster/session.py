"""The client side of the Ray edge: join or start a cluster, find the master, submit.

Used by the CLI (through cicd_ray.cli.connect.RayRunner), the benchmarks and the tests.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from pathlib import Path

import ray

from cicd_ray.config import Settings
from cicd_ray.errors import MasterUnavailable, SpecError
from cicd_ray.master.actor import master_actor
from cicd_ray.names import MASTER_NAME, NAMESPACE
from cicd_ray.pipeline.model import PipelineSpec
from cicd_ray.protocol import Rejected, SourceRef, SubmitCommand
from cicd_ray.source import snapshot, source_folder
from cicd_ray.store.blobs import ArtifactStore

MASTER_START_TIMEOUT_S = 120.0


def connect(
    address: str | None = None, settings: Settings | None = None, num_cpus: float | None = None
) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start an embedded one.

    Returns True when an embedded cluster was started (the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
        return False
    settings = settings or Settings.from_env()
    wanted = sum(p.max_workers * p.cpus for p in settings.pools.values())
    cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(wanted))
    # "local": a new instance of its own. Without an address Ray would join the cluster named
    # in its note of the machine's latest `ray start` (even one of someone else, or a dead one).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
    return True


def call(ref, timeout_s: float | None = None):
    """`ray.get` with Ray's errors turned into ours: callers handle MasterUnavailable only."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayError as e:
        raise MasterUnavailable(f"the master {MASTER_NAME!r} did not answer: {e}") from None


def ensure_master(settings: Settings | None = None):
    """The master's handle, creating the detached actor if no one has yet."""
    settings = settings or Settings.from_env()
    master = master_actor(settings).remote(settings)
    call(master.ping.remote(), MASTER_START_TIMEOUT_S)
    return master


def submit(
    master,
    spec: PipelineSpec,
    pipeline_dir: Path,
    source_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    settings: Settings | None = None,
    secrets: dict[str, str] | None = None,
) -> str:
    """Snapshot the source, submit, and return the run id once the run is durable.
    `secrets`: the submission's own (given to the steps that list them, never stored with
    the run)."""
    settings = settings or Settings.from_env()
    folder = source_folder(spec.source, pipeline_dir, source_dir)
    source = None
    if folder is not None:  # into the artifact store the master names: it handles the digest
        digest, data = snapshot(folder, settings.source_limit_bytes)
        blobs = ArtifactStore(call(master.ping.remote())["artifacts"])
        source = SourceRef(digest=blobs.put(io.BytesIO(data)), size=len(data))
        assert source.digest == digest
    answer = call(
        master.submit.remote(
            SubmitCommand(
                pipeline=spec.model_dump(mode="json"),
                env=env or {},
                source=source,
                secrets=secrets or {},
            )
        )
    )
    if isinstance(answer, Rejected):
        raise SpecError(answer.problems, source=spec.name)
    return answer.run_id


def shutdown_embedded(master) -> None:
    """Stop the workers and the embedded cluster the CLI started."""
    with contextlib.suppress(ray.exceptions.RayError):
        ray.get(master.stop_workers.remote(), timeout=10)
    ray.shutdown()
