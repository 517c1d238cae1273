"""The process pool that trains members (`member_workers`) or scores them, and the state each worker
process holds for its jobs.

Each worker gets the frozen proxy once (shared, not copied: CUDA IPC on a GPU, shared memory on a
CPU) and handles whole members; a member's result is the same as in the main process. Workers are
forked from a forkserver (a clean process, which never touches CUDA) that imported torch, peft and the
proxy's modules once, so only the first pool of a process pays for those imports; where there is no
forkserver (Windows), they are spawned.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# What this process's pool initializer built (a trainer, a scorer): a worker's jobs read it here.
_HELD: dict[str, Any] = {}


def can_spawn() -> bool:
    """A daemonic process (a worker of a multi-process map) may not start processes of its own."""
    import multiprocessing

    return not multiprocessing.current_process().daemon


# What every worker imports, beside the modules of the proxy's classes.
PRELOAD = ("torch", "peft", "gradfilter_ops.engine.training", "gradfilter_ops.engine.scoring")


def worker_context(model: torch.nn.Module):
    """The multiprocessing context of the pools: a forkserver that preloads `PRELOAD` and the modules of
    `model`'s classes (set when it first starts), else spawn. Never fork: a forked child cannot use CUDA."""
    import torch.multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    modules = {type(m).__module__ for m in model.modules()} - {"__main__"}  # a worker imports `__main__` itself
    context.set_forkserver_preload([*PRELOAD, *sorted(modules)])
    return context


def member_pool(workers: int, model: torch.nn.Module, initializer: Callable, *initargs):
    """`workers` processes (`worker_context`), each with its share of the threads, each running
    `initializer(*initargs)` once (which `hold`s what its jobs need)."""
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // workers)
    return ProcessPoolExecutor(workers, mp_context=worker_context(model), initializer=_start_worker,
                               initargs=(threads, initializer, initargs))


def _start_worker(threads: int, initializer: Callable, initargs: tuple) -> None:
    torch.set_num_threads(threads)
    initializer(*initargs)


def hold(name: str, value: Any) -> None:
    """Keep `value` in this worker process for its jobs (called by a pool initializer)."""
    _HELD[name] = value


def held(name: str) -> Any:
    """What the pool initializer of this worker process kept under `name`."""
    return _HELD[name]
