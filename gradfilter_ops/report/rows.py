"""Reading a selection for the report: the kept and dropped rows, or scored rows and a top ratio.

Rows carry the score fields (`gsnr`, `gsnr_early`, ... see `gradfilter_ops/fields.py`) either under
`__dj__stats__` (Data-Juicer with `keep_stats_in_res_ds: true`) or as top-level columns (the
`datasets` API); both layouts are read, also mixed in one file. Each row becomes a record: its score
fields, kept or not, the reason, its group and its text.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .. import fields
from ..dropped import DROP_REASON
from ..selection import select

STATS_KEY = "__dj__stats__"  # data_juicer.utils.constant.Fields.stats (not imported: it is slow)
NO_STATUS = "(no status)"  # a row without a `gsnr_status` (never scored)
NO_REASON = "(no reason given)"  # a dropped row without a `gsnr_drop_reason`
NO_GROUP = "(missing)"  # a row without the --group-by field
DEFAULT_TOP_RATIO = 0.1


def as_number(value: Any) -> Optional[float]:
    """A float for an int or float (NaN and infinities kept), None for anything else (bools too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def score_fields(row: dict) -> dict[str, Any]:
    """The G-SNR fields of a row, from `__dj__stats__` when they are there, else from its columns."""
    stats = row.get(STATS_KEY)
    source = stats if isinstance(stats, dict) and any(f in stats for f in fields.SCORE_FIELDS) else row
    out = {f: as_number(source.get(f)) for f in fields.PARTS}
    for f in (fields.RESPONSE_TOKENS, fields.TOTAL_TOKENS):
        out[f] = as_number(source.get(f))
    status = source.get(fields.STATUS)
    out[fields.STATUS] = status if isinstance(status, str) and status else NO_STATUS
    truncated = source.get(fields.TRUNCATED)
    out[fields.TRUNCATED] = truncated if isinstance(truncated, bool) else None
    return out


def example_text(row: dict, instruction_field: str = "instruction", input_field: str = "input",
                 output_field: str = "output", messages_field: str = "messages") -> tuple[str, str]:
    """(prompt, response) text of a row: Alpaca fields, else the last chat turns, else `text`."""
    instruction, output = row.get(instruction_field), row.get(output_field)
    if instruction is not None or output is not None:
        prompt = "" if instruction is None else str(instruction)
        extra = row.get(input_field)
        if extra not in (None, ""):
            prompt = f"{prompt}\n{extra}"
        return prompt, "" if output is None else str(output)
    messages = row.get(messages_field)
    if isinstance(messages, list) and messages:
        turns = [m for m in messages if isinstance(m, dict)]
        last = {m.get("role"): str(m.get("content", "")) for m in turns}
        return last.get("user", ""), last.get("assistant", "")
    return str(row.get("text", "")), ""


def make_record(row: dict, index: int, kept: bool, reason: Optional[str], group_by: Optional[str],
                text_fields: dict[str, str]) -> dict:
    """One row as the report sees it: its score fields, kept or not, the reason, group and text."""
    prompt, response = example_text(row, **text_fields)
    group = None
    if group_by is not None:
        value = row.get(group_by)
        group = NO_GROUP if value is None else str(value)
    return {"index": index, "kept": kept, "reason": reason, "group": group,
            "prompt": prompt, "response": response, **score_fields(row)}


def report_rows(kept: Optional[Sequence[dict]] = None, dropped: Optional[Sequence[dict]] = None,
              scored: Optional[Sequence[dict]] = None, top_ratio: Optional[float] = None,
              group_by: Optional[str] = None, text_fields: Optional[dict[str, str]] = None) -> list[dict]:
    """Records for the report, from kept (+ dropped) rows, or from scored rows and a top ratio.

    Scored rows are selected as `gsnr_top_k_filter` would with `top_ratio` (ranked by `gsnr`, ties by
    order, rows without a score last); the others get its reason codes.
    """
    text_fields = text_fields or {}
    if (kept is None) == (scored is None):
        raise ValueError("Give either the kept rows (and optionally the dropped rows) or the scored rows.")
    if scored is not None:
        if dropped is not None:
            raise ValueError("The dropped rows go with the kept rows, not with the scored rows.")
        records = [make_record(r, i, False, None, group_by, text_fields) for i, r in enumerate(scored)]
        if not records:
            return records
        selection = select([r[fields.GSNR] for r in records], [r[fields.STATUS] for r in records],
                           top_ratio=DEFAULT_TOP_RATIO if top_ratio is None else top_ratio)
        for i in selection.keep:
            records[i]["kept"] = True
        for i, reason in selection.reasons.items():
            records[i]["reason"] = reason
        return records
    records = [make_record(r, i, True, None, group_by, text_fields) for i, r in enumerate(kept)]
    for j, row in enumerate(dropped or ()):
        reason = row.get(DROP_REASON)
        reason = str(reason) if reason not in (None, "") else NO_REASON
        records.append(make_record(row, len(kept) + j, False, reason, group_by, text_fields))
    return records
