"""Run an installed command (`dj-process`, `dj-analyze`) or a function as a child process that starts with its
imports done (`run_command`, `call`, `start`).

A `dj-process` run of the tiny proxy spends most of its time importing torch, transformers, Data-Juicer and the
plugin (about 6 s of CPU on 2 cores). Here each run is forked from one server process per test worker that
imported them once (`multiprocessing`'s forkserver with a preload list): a fresh process per run, with its own
state, exit code and output, calling the same entry point as the console script with the same arguments. The
server takes the environment of the test worker when it starts; a run that needs another environment is started
with `subprocess` instead. It is multiprocessing's one forkserver of the test worker, so the package's member-worker
pools started in that worker (`engine.workers`) fork from it too."""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

# console script -> its entry point, as in Data-Juicer's and our pyproject.toml
ENTRY_POINTS = {"dj-process": "data_juicer.tools.process_data", "dj-analyze": "data_juicer.tools.analyze_data"}
PRELOAD = ["torch", "transformers", "transformers.models.gpt2.modeling_gpt2", "peft", "datasets",
           "data_juicer.core", "gradfilter_ops.ops", *ENTRY_POINTS.values()]

_context: Optional[multiprocessing.context.BaseContext] = None


@dataclass
class Finished:
    returncode: int
    log: str  # stdout and stderr, interleaved as written


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


@dataclass
class Called:
    returncode: int
    stdout: str
    stderr: str


def _redirect(out_path: str, err_path: str) -> None:
    """In a forked child: send fds 1 and 2 to these files (the same file where the paths are equal)."""
    sys.stdout.flush(), sys.stderr.flush()
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = out if err_path == out_path else os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1), os.dup2(err, 2)


def _run(module: str, argv: list[str], cwd: Optional[str], log_path: str) -> None:
    """In the forked child: send fds 1 and 2 to `log_path`, then run the entry point as its script does."""
    import importlib

    _redirect(log_path, log_path)
    if cwd:
        os.chdir(cwd)
    sys.argv = argv
    sys.exit(importlib.import_module(module).main())


def _call(target: Callable, args: tuple, out_path: str, err_path: str) -> None:
    _redirect(out_path, err_path)
    target(*args)


def start(target: Callable, *args) -> multiprocessing.process.BaseProcess:
    """`target(*args)` in a started child of the warm server (a module-level function; its output is the test
    worker's): a process of its own, to wait for (`join`, `exitcode`) or to kill."""
    child = _server().Process(target=target, args=args)
    child.start()
    return child


def _wait(child: multiprocessing.process.BaseProcess, timeout: float, what: str) -> None:
    """Wait for `child`; one still running after `timeout` seconds is killed and raises."""
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise TimeoutError(f"{what} ran over {timeout} s")


def run_command(command: str, args: Sequence[str], cwd: Optional[Path] = None, timeout: float = 600) -> Finished:
    """`command args...` (a console script of `ENTRY_POINTS`) in a forked child of the warm server."""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "log")
        child = start(_run, ENTRY_POINTS[command], [command, *map(str, args)], str(cwd) if cwd else None, log_path)
        _wait(child, timeout, f"{command} {' '.join(map(str, args))}")
        return Finished(child.exitcode, Path(log_path).read_text(errors="replace"))


def call(target: Callable, *args, timeout: float = 600) -> Called:
    """`target(*args)` (a module-level function) in a forked child of the warm server, its stdout and stderr
    captured apart, as `subprocess.run(..., capture_output=True)` gives them; an exception exits 1."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        child = start(_call, target, args, out, err)
        _wait(child, timeout, f"{target.__name__}{args}")
        return Called(child.exitcode, *(Path(p).read_text(errors="replace") for p in (out, err)))
