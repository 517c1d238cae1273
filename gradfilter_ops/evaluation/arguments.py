"""What the three `gsnr-eval` commands share on their command lines: `--set key=value` overrides,
the `GSNRConfig` they build, and the quoting of the command that their reports print."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional

DEFAULT_CONFIG = {"hf_model": "smollm2-135m", "device": "cpu"}


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON where they parse (numbers, true, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_config(hf_model: Optional[str], overrides: Mapping[str, Any]):
    """The `GSNRConfig` of a run: the evaluation's defaults, `--hf-model`, then the `--set` overrides."""
    from ..config import GSNRConfig

    values = dict(DEFAULT_CONFIG)
    if hf_model:
        values["hf_model"] = hf_model
    values.update(overrides)
    return GSNRConfig.from_dict(values)


def quote(arg: str) -> str:
    """`arg` as it can be pasted into a shell: bare when it is plain, else JSON-quoted."""
    return arg if all(c.isalnum() or c in "-_=./:,+" for c in arg) else json.dumps(arg)
