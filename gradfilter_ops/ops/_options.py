"""The ops' recipe options: one mechanism builds every op's typed `__init__` signature and its
`:param` docs, from `GSNRConfig`'s fields and the few options an op adds.

Data-Juicer reads an op's options from `inspect.signature(op.__init__)` (its preflight check of names
and types) and jsonargparse from the same signature plus the `:param` lines of the docstring (the
`--help` of `dj-process`), so an `__init__(self, *args, **kwargs)` given a `__signature__` here takes
the options as if they were written out, and `bind_options` reads them back.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class Option:
    """One recipe option: its name, type, default and one line of help."""

    name: str
    kind: Any
    default: Any
    help: str


def config_options(config_class: type) -> tuple[Option, ...]:
    """The options of a config dataclass, one per field, typed (`recipe_type`) and documented as the field is."""
    hints = get_type_hints(config_class)
    return tuple(Option(f.name, recipe_type(hints[f.name]), f.default, f.metadata["help"])
                 for f in dataclasses.fields(config_class))


def recipe_type(kind: Any) -> Any:
    """`kind` with each restricted number type (`PositiveInt`, ...) replaced by its int or float: Data-Juicer's
    preflight checks a recipe's plain numbers with `isinstance` against the annotation, which a `PositiveInt`
    refuses for every int; the config checks the range when it is built."""
    if get_origin(kind) is Union:
        return Optional[recipe_type(next(k for k in get_args(kind) if k is not type(None)))]
    if isinstance(kind, type) and kind not in (int, float, bool) and issubclass(kind, (int, float)):
        return int if issubclass(kind, int) else float
    return kind


RANGE_OPTIONS = (
    Option("min_gsnr", Optional[float], None,
           "Keep rows with gsnr >= min_gsnr (optional; by default every row is kept)."),
    Option("max_gsnr", Optional[float], None, "Keep rows with gsnr <= max_gsnr (optional)."),
)
RAY_OPTIONS = (
    Option("train_tasks", int, 1, "Ray tasks the ensemble's members are split over, each on a GPU of its own "
                                          "when the cluster has GPUs (members are independent: the same scores). "
                                          "`num_proc` is the number of scoring actors."),
)
TOP_K_OPTIONS = (
    Option("top_k", Optional[int], None, "number of rows to keep."),
    Option("top_ratio", Optional[float], None, "share of rows to keep, in (0, 1]."),
    Option("max_tokens", Optional[int], None, "token budget: keep the best rows while their `gsnr_tokens` fit."),
    Option("group_by", Optional[str], None, "field whose values form groups that get quotas of the row budget."),
    Option("group_quota", str, "proportional", "`proportional` (to group size) or `equal`."),
    Option("min_per_group", int, 0, "rows every group keeps at least (if it has them), even past the budget."),
    Option("diversity", Optional[str], None,
           "`clusters`: quotas per `gsnr_cluster` (the scorer's `clusters: true`) instead of `group_by`; "
           "`length`: quotas per response-length quintile of the scored rows (`gsnr_response_tokens`); ranked "
           "by G-SNR inside each group; null: none."),
    Option("near_duplicates", str, "keep",
           "`drop`: of each `gsnr_duplicate_group` (the scorer's `near_duplicate_threshold`) keep the row with the "
           "best G-SNR and drop the others as `near_duplicate`, before the budget; `keep`: no dedup."),
    Option("dropped_path", Optional[str], None,
           "jsonl file for the dropped rows; default `<work_dir>/gsnr_dropped.jsonl` (`gsnr_dropped_step<N>.jsonl` "
           "for step N of a recipe with several top-k steps); not the dataset, the export or another step's file."),
    Option("keep_dropped", bool, True, "write the dropped rows at all."),
)


def recipe_options(*groups: Iterable[Option]) -> Callable[[Callable], Callable]:
    """Give an `__init__(self, *args, **kwargs)` the options of `groups`, in order, as named, typed
    parameters before `*args`, with a `:param` line each in its docstring."""
    options = [option for group in groups for option in group]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kind)]
    params += [inspect.Parameter(o.name, kind, default=o.default, annotation=o.kind) for o in options]
    params += [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
               inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]

    def decorate(init: Callable) -> Callable:
        init.__signature__ = inspect.Signature(params)
        init.__annotations__ = {o.name: o.kind for o in options}
        init.__doc__ = "Initialization method.\n\n" + "\n".join(f":param {o.name}: {o.help}" for o in options)
        return init

    return decorate


def bind_options(init: Callable, self: Any, args: tuple, kwargs: dict) -> tuple[dict[str, Any], tuple, dict]:
    """(the named options, defaults filled in; the positional rest; the keywords left for the base op)."""
    bound = inspect.signature(init).bind(self, *args, **kwargs)
    bound.apply_defaults()
    named = {name: value for name, value in bound.arguments.items() if name not in ("self", "args", "kwargs")}
    return named, tuple(bound.arguments.get("args", ())), dict(bound.arguments.get("kwargs", {}))


def reject_unknown_options(op_name: str, kwargs: Mapping[str, Any], base: type) -> None:
    """A misspelt option would otherwise vanish into Data-Juicer's `**kwargs` and be ignored."""
    unknown = sorted(set(kwargs) - set(base._BASE_PARAMS))
    if unknown:
        raise ValueError(f"{op_name}: unknown option(s) {unknown}; see the op's docstring for its options.")
