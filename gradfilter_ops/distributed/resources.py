"""What each Ray task or actor asks for: a GPU each when the cluster has GPUs (and `device` allows),
else a node's CPUs shared out among them; and the tasks that need torch, a pool of worker processes of their
own (`MODEL_TASKS`)."""

from __future__ import annotations

from typing import Optional


# Ray gives a task an idle worker process of the task's runtime env, whichever task that process ran before. The
# tasks that need torch, transformers and peft (training, and the group fields written from a fitted scorer) name a
# runtime env of their own (an environment variable, merged into the job's runtime env), so they run in the
# processes where an earlier such task imported them, not in the processes that only read a few fields of a block,
# which stay cheap. What a process's imports cost and what this saves, with machine and command: `docs/speed.md`,
# "Worker processes".
MODEL_TASKS = {"env_vars": {"GRADFILTER_RAY_TASKS": "model"}}


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


def model_task_options(device: str, num_cpus: Optional[float], num_gpus: Optional[float], tasks: int) -> dict:
    """The Ray options of each of `tasks` tasks that need torch: `task_resources`, in the `MODEL_TASKS` pool."""
    cpus, gpus = task_resources(device, num_cpus, num_gpus, tasks)
    return {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": MODEL_TASKS}
