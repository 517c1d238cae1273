"""What each Ray task or actor asks for: a GPU each when the cluster has GPUs (and `device` allows),
else a node's CPUs shared out among them."""

from __future__ import annotations

from typing import Optional


def _gpus_per_worker(device: str) -> int:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise RuntimeError("`device: cuda` was asked for, but the Ray cluster has no GPU.")
    return 0 if device == "cpu" or not gpus else 1


def _node_cpus() -> int:
    import ray

    return max(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"])


def task_resources(device: str, num_cpus: Optional[float], num_gpus: Optional[float],
                   workers: int) -> tuple[float, float]:
    """(CPUs, GPUs) of each of `workers` tasks or actors: as given, else one GPU each when the cluster
    has GPUs (and `device` allows), else a node's CPUs shared out among them."""
    gpus = _gpus_per_worker(device) if num_gpus is None else num_gpus
    cpus = num_cpus if num_cpus is not None else (1 if gpus else max(1, _node_cpus() // workers))
    return cpus, gpus

