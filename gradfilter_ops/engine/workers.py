"""The spawned process pool that trains members (`member_workers`) or scores them, and the state
each worker process holds for its jobs.

Each worker gets the frozen proxy once (shared, not copied: CUDA IPC on a GPU, shared memory on a
CPU) and handles whole members; a member's result is the same as in the main process.
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


def member_pool(workers: int, initializer: Callable, *initargs):
    """`workers` spawned processes (a forked child cannot use CUDA), each with its share of the threads,
    each running `initializer(*initargs)` once (which `hold`s what its jobs need)."""
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // workers)
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
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
