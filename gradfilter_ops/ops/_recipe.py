"""What the ops check in the `dj-process` recipe around them (Data-Juicer's global config): the input
files before the loader reads them, and the dropped-rows files when an op is built.

Data-Juicer loads the dataset before it builds the ops, so `install_input_check` (run when Data-Juicer
imports the ops, the earliest point our code runs) wraps its loader: a recipe with a G-SNR step has its
JSON-lines input checked first, with errors that name the file and line, instead of failing inside
Data-Juicer's loader without them or losing rows there unrecorded.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from typing import Any, Optional

from data_juicer.utils.constant import Fields
from loguru import logger

from ..jsonl import InputFileError, iter_jsonl

SUFFIX_FIELD = Fields.suffix  # the file suffix, which Data-Juicer's loader adds only to a file without it
SCORER_STEPS = ("gsnr_scorer", "ray_gsnr_scorer")
TOP_K_STEPS = ("gsnr_top_k_filter", "ray_gsnr_top_k_filter")
SCORER_DROPPED_FILE = "gsnr_scorer_dropped.jsonl"  # rows outside min_gsnr / max_gsnr
TOP_K_DROPPED_FILE = "gsnr_dropped.jsonl"
PRIOR_STATS = "__gsnr_prior_stats__"  # the stats of partly scored input, while Data-Juicer's filters run


def recipe() -> Optional[Any]:
    """The config of the running `dj-process` (None outside one)."""
    from data_juicer.config import config

    return config.global_cfg


def steps(cfg: Any) -> list[tuple[str, dict]]:
    """(op name, options) of each step of the recipe's `process`, in order."""
    return [(name, dict(options or {})) for step in (cfg.get("process") or []) for name, options in step.items()]


def step_index(op: Any, cfg: Any) -> Optional[int]:
    """The position of `op` in the recipe's `process` (Data-Juicer gives each op its step as `_op_cfg`)."""
    step = getattr(op, "_op_cfg", None)
    if cfg is None or step is None:
        return None
    return next((i for i, each in enumerate(cfg.get("process") or []) if each is step), None)


def default_dropped_file(base: str, kinds: tuple[str, ...], index: Optional[int], cfg: Any) -> str:
    """`base`, or `<stem>_step<N>.jsonl` for step N when the recipe has several steps of `kinds`: each writes
    its own file."""
    if cfg is None or index is None or sum(name in kinds for name, _ in steps(cfg)) < 2:
        return base
    stem, ext = os.path.splitext(base)
    return f"{stem}_step{index + 1}{ext}"


def scorer_dropped_path(op) -> Optional[str]:
    """Where a scorer op writes the rows outside its range: `<work_dir>/gsnr_scorer_dropped.jsonl`
    (`gsnr_scorer_dropped_step<N>.jsonl` for step N of a recipe with several scorer steps)."""
    cfg = recipe()
    name = default_dropped_file(SCORER_DROPPED_FILE, SCORER_STEPS, step_index(op, cfg), cfg)
    return os.path.join(op.work_dir, name) if op.work_dir else None


def dropped_files(cfg: Any) -> list[tuple[str, str]]:
    """(step, path) of every dropped-rows file the recipe's G-SNR steps write."""
    work_dir, files = cfg.get("work_dir"), []
    for index, (name, options) in enumerate(steps(cfg)):
        if name in TOP_K_STEPS and options.get("keep_dropped", True):
            path = options.get("dropped_path") or (
                work_dir and os.path.join(work_dir, default_dropped_file(TOP_K_DROPPED_FILE, TOP_K_STEPS, index, cfg)))
        elif name in SCORER_STEPS and (options.get("min_gsnr") is not None or options.get("max_gsnr") is not None):
            path = work_dir and os.path.join(work_dir,
                                             default_dropped_file(SCORER_DROPPED_FILE, SCORER_STEPS, index, cfg))
        else:
            continue
        if path:
            files.append((f"step {index + 1} (`{name}`)", path))
    return files


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def check_dropped_files(cfg: Any) -> None:
    """A ValueError, before any op runs, when a dropped-rows file of the recipe is the dataset, the export (or
    its stats file) or another step's dropped-rows file: writing it would replace those rows."""
    if cfg is None:
        return
    taken: dict[str, str] = {}
    dataset = cfg.get("dataset_path")
    if isinstance(dataset, str) and dataset:
        taken[_real(dataset)] = "the dataset (`dataset_path`)"
    export = cfg.get("export_path")
    if isinstance(export, str) and export:
        taken[_real(export)] = "the export (`export_path`)"
        stem, ext = os.path.splitext(export)
        taken[_real(f"{stem}_stats.jsonl")] = "the export's stats file"
    for step, path in dropped_files(cfg):
        real = _real(path)
        inside = [what for where, what in taken.items() if real == where or real.startswith(where + os.sep)]
        if inside:
            raise ValueError(f"{step}: its dropped-rows file {path} is {inside[0]}, so writing it would replace those "
                             "rows; set `dropped_path` to a file of its own.")
        taken[real] = f"the dropped-rows file of {step}"


def input_files(cfg: Any) -> list[str]:
    """The local JSON-lines files of the recipe's `dataset_path` (a `.jsonl` file, or those in a folder)."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path:
        return []
    if os.path.isfile(path):
        return [path] if path.endswith(".jsonl") else []
    if os.path.isdir(path):
        return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                      if name.endswith(".jsonl"))
    return []


def has_gsnr_step(cfg: Any) -> bool:
    return any(name in SCORER_STEPS + TOP_K_STEPS for name, _ in steps(cfg))


def set_aside_partial_stats(dataset: Any) -> Any:
    """`dataset`, with its `__dj__stats__` column renamed to `PRIOR_STATS` when only some rows have stats (earlier
    output plus new rows): Data-Juicer's filters fail on a row with null stats and drop its whole batch, and on one
    whose stats hold their key as null; so they compute fresh stats for every row, and the G-SNR ops put the
    earlier ones back (`restore_prior_stats`)."""
    if Fields.stats not in getattr(dataset, "column_names", ()) or None not in dataset[Fields.stats]:
        return dataset
    from data_juicer.core.data import NestedDataset

    logger.info(f"gradfilter_ops: only some rows have `{Fields.stats}`; the G-SNR ops put them back after "
                "Data-Juicer's filters computed theirs for every row.")
    return NestedDataset(dataset.rename_column(Fields.stats, PRIOR_STATS))


def restore_prior_stats(dataset: Any) -> Any:
    """`dataset` with the stats that `set_aside_partial_stats` set aside merged back into `__dj__stats__` (the
    stats computed since win)."""
    if PRIOR_STATS not in dataset.column_names:
        return dataset
    from data_juicer.core.data import NestedDataset

    if Fields.stats not in dataset.column_names:
        return NestedDataset(dataset.rename_column(PRIOR_STATS, Fields.stats))

    def merge(batch):
        return {Fields.stats: [{**(prior or {}), **(now or {})} for prior, now in zip(batch[PRIOR_STATS],
                                                                                     batch[Fields.stats])]}

    merged = dataset.map(merge, batched=True, desc="gsnr: stats of the rows that came with stats")
    return NestedDataset(merged.remove_columns([PRIOR_STATS]))


def check_input(cfg: Any) -> None:
    """For a recipe with a G-SNR step: every JSON-lines input file reads as JSON lines (`jsonl.iter_jsonl`), is
    not empty, and, on the default executor, has the `text_keys` fields in every row, since Data-Juicer's loader
    drops a row where one is null or missing, before any op and unrecorded. `InputFileError` names the file and
    line."""
    names = [name for name, _ in steps(cfg)]
    if not has_gsnr_step(cfg):
        return
    keys = cfg.get("text_keys") or []
    keys = [keys] if isinstance(keys, str) else list(keys)
    loader_drops = cfg.get("executor_type", "default") == "default"
    for path in input_files(cfg):
        rows, without = 0, {key: [] for key in keys}  # key -> line numbers of the rows without it
        for number, row in iter_jsonl(path):
            rows += 1
            for key in keys:
                if row.get(key) is None:
                    without[key].append(number)
        if not rows:
            raise InputFileError(f"{path}: no rows (the file is empty).")
        if loader_drops:
            for key, lines in without.items():
                _check_text_key(path, key, lines, rows, "suffix_filter" in names)


def _check_text_key(path: str, key: str, lines: list[int], rows: int, adds_suffix: bool) -> None:
    if not lines or (key == SUFFIX_FIELD and adds_suffix and len(lines) == rows):
        return  # every row has it, or the loader adds it to every row (no row of the file has it)
    fix = (f"the other rows carry `{SUFFIX_FIELD}` from an earlier Data-Juicer run: remove that field from "
           "every row of the file" if key == SUFFIX_FIELD else
           "give every row the field, or set `text_keys` to a field that no row leaves null")
    raise InputFileError(f"{path}:{lines[0]}: {len(lines)} of {rows} rows have no `{key}` (the first on this line), "
                         f"and Data-Juicer's loader drops such rows (`text_keys: {key}`) before any op runs; {fix}.")


BUILDER_MODULE = "data_juicer.core.data.dataset_builder"


def check_before_loading(builder_class: type) -> None:
    """Make `builder_class.load_dataset` (Data-Juicer's loader) run `check_input` on the recipe first."""
    load = builder_class.load_dataset
    if getattr(load, "checks_gsnr_input", False):
        return

    @functools.wraps(load)
    def load_dataset(self, *args, **kwargs):
        cfg = getattr(self, "cfg", None)
        if cfg is None or not has_gsnr_step(cfg):
            return load(self, *args, **kwargs)
        check_input(cfg)
        return set_aside_partial_stats(load(self, *args, **kwargs))

    load_dataset.checks_gsnr_input = True
    builder_class.load_dataset = load_dataset


class _AfterBuilderImport(importlib.abc.MetaPathFinder):
    """Finds Data-Juicer's dataset builder module as the other finders do, and wraps its loader once the module
    has run: the ops are imported while `data_juicer.config` is still loading, before the builder can be."""

    def find_spec(self, name, path, target=None):
        if name != BUILDER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            builder = getattr(module, "DatasetBuilder", None)
            if builder is not None and hasattr(builder, "load_dataset"):
                check_before_loading(builder)
            else:  # another Data-Juicer layout: the ops work, the input is not checked first
                logger.warning(f"gradfilter_ops: no {BUILDER_MODULE}.DatasetBuilder.load_dataset; input files are not "
                               "checked before Data-Juicer loads them.")

        spec.loader.exec_module = exec_module
        return spec


def install_input_check() -> None:
    """Run `check_input` on the recipe each time Data-Juicer's loader is about to read its dataset."""
    if BUILDER_MODULE in sys.modules:
        check_before_loading(sys.modules[BUILDER_MODULE].DatasetBuilder)
    elif not any(isinstance(finder, _AfterBuilderImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterBuilderImport())
