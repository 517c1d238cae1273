"""Shared checks of the ops' recipe options, and the recipe options of their Ray variants."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping


def reject_unknown_options(op_name: str, kwargs: Mapping[str, Any], base: type) -> None:
    """A misspelt option would otherwise vanish into Data-Juicer's `**kwargs` and be ignored."""
    unknown = sorted(set(kwargs) - set(base._BASE_PARAMS))
    if unknown:
        raise ValueError(f"{op_name}: unknown option(s) {unknown}; see the op's docstring for its options.")


def options_of(source: Callable, **extra: Any) -> Callable[[Callable], Callable]:
    """Give an `__init__(self, *args, **kwargs)` the recipe options of `source` (another op's
    `__init__`) plus `extra` (name=default), so that a Ray variant takes the same options as its op
    and Data-Juicer's preflight check knows them; `bind_options` reads them back."""
    params = list(inspect.signature(source).parameters.values())
    at = next(i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL)
    params[at:at] = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                       annotation=type(default) if default is not None else inspect.Parameter.empty)
                     for name, default in extra.items()]

    def decorate(init: Callable) -> Callable:
        init.__signature__ = inspect.Signature(params)
        return init

    return decorate


def bind_options(init: Callable, self: Any, args: tuple, kwargs: dict) -> tuple[dict[str, Any], tuple, dict]:
    """(the named options, defaults filled in; the positional rest; the keywords left for the base op)."""
    bound = inspect.signature(init).bind(self, *args, **kwargs)
    bound.apply_defaults()
    named = {name: value for name, value in bound.arguments.items() if name not in ("self", "args", "kwargs")}
    return named, tuple(bound.arguments.get("args", ())), dict(bound.arguments.get("kwargs", {}))
