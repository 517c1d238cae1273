"""How many torch threads a process runs a scorer with, when the scorer was sent to it.

A `GSNRScorer` pickled into a worker of `datasets`' forked map must run torch on one thread: the
parallelism comes from the processes, and a forked child that enters the parent's OpenMP thread pool
deadlocks. A copy shipped to a Ray task or actor keeps its CPUs instead: it sets torch's threads to
what Ray assigned it (`use_ray_assigned_cpus`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ThreadPolicy:
    """Torch threads for a copy of a scorer that is unpickled in another process (`threads`; None:
    leave torch as it is)."""

    threads: Optional[int]

    def apply(self, pickled_by: Optional[int]) -> None:
        """Set torch's threads when this process is not `pickled_by`, the one that pickled the scorer."""
        if self.threads is not None and pickled_by != os.getpid():
            import torch

            torch.set_num_threads(self.threads)


FORKED_MAP_WORKER = ThreadPolicy(threads=1)  # the default: `datasets`' forked map workers
KEEP_THREADS = ThreadPolicy(threads=None)  # Ray workers, which call `use_ray_assigned_cpus`


def use_ray_assigned_cpus() -> None:
    """Torch threads = the CPUs Ray gave this task or actor."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
