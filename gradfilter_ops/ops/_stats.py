"""The `__dj__stats__` column as the ops read it: every row's stats a mapping (or null), else an error naming
the row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_juicer.utils.constant import Fields


def checked_stats(op_name: str, dataset: Any) -> list:
    """Every row's `__dj__stats__` (an empty list without the column); a ValueError names the first row whose
    stats are neither a mapping nor null, instead of an AttributeError deep inside the op."""
    if Fields.stats not in dataset.column_names:
        return []
    stats = dataset[Fields.stats]
    for i, value in enumerate(stats):
        if value is not None and not isinstance(value, Mapping):
            row_id = dataset[i].get("id") if "id" in dataset.column_names else None
            named = f"row {i}" + (f" (id {row_id!r})" if row_id is not None else "")
            raise ValueError(f"{op_name}: {named} has `{Fields.stats}` = {str(value)[:80]!r} "
                             f"({type(value).__name__}), not a mapping of stats; remove the field from that row "
                             "or give it the stats as an object.")
    return stats
