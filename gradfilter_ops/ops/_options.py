"""Shared checks of the ops' recipe options."""

from __future__ import annotations

from typing import Any, Mapping


def reject_unknown_options(op_name: str, kwargs: Mapping[str, Any], base: type) -> None:
    """A misspelt option would otherwise vanish into Data-Juicer's `**kwargs` and be ignored."""
    unknown = sorted(set(kwargs) - set(base._BASE_PARAMS))
    if unknown:
        raise ValueError(f"{op_name}: unknown option(s) {unknown}; see the op's docstring for its options.")
