"""A local autoscaling Ray cluster on one machine, to watch real scaling without a cloud.

Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`) starts and stops real raylets on this
machine as the autoscaler asks for nodes. The config is written from the pools file, one node
type per pool (a node is one worker: the pool's CPUs, memory and custom resources), the same
mapping the KubeRay manifests use (one worker group per pool), so the local cluster scales the
way the real one will. The head offers no CPUs: steps only run on nodes the autoscaler adds.
"""

from __future__ import annotations

import math

from cicd_ray.pools import PoolConfig

HEAD_TYPE = "ray.head.default"
# Each fake node's shared-memory object store: small, since steps pass no objects.
NODE_OBJECT_STORE_BYTES = 100 * 1024 * 1024


def node_type(pool: PoolConfig) -> str:
    return f"pool-{pool.name}"


def node_resources(pool: PoolConfig) -> dict[str, float]:
    """What one node of the pool's type offers: exactly one worker of the pool. (Not its
    memory: the fake provider cannot declare it, so workers there reserve none.)"""
    return {"CPU": math.ceil(pool.cpus), **pool.resources}


def autoscaler_config(
    pools: dict[str, PoolConfig], gcs_address: str, idle_timeout_s: float = 60.0
) -> dict:
    """The autoscaler's cluster config for the fake provider."""
    types: dict[str, dict] = {
        HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    }
    for pool in pools.values():
        types[node_type(pool)] = {
            "resources": {**node_resources(pool), "object_store_memory": NODE_OBJECT_STORE_BYTES},
            # No floor here: the master keeps the pool's minimum as worker actors, and their
            # demand brings the nodes (a node floor of its own could sit beside them, empty).
            "node_config": {},
            "min_workers": 0,
            "max_workers": pool.max_workers,
        }
    return {
        "cluster_name": "cicd-ray-local",
        "max_workers": sum(p.max_workers for p in pools.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
