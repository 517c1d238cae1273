"""The summary of a scoring run: rows per reason code and the share of scored rows whose gradient
grew from the early to the late epoch (negative drop), with a warning when it is most of them."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from loguru import logger

from .engine.gsnr import NEGATIVE_DROP_WARN_SHARE, negative_drop_share

__all__ = ["NEGATIVE_DROP_WARN_SHARE", "log_summary", "summarize"]


def summarize(statuses: Sequence[str], drops: Sequence[Optional[float]]) -> dict[str, Any]:
    """Counts per reason code and the share of scored rows whose gradient grew (negative drop)."""
    return {"rows": len(statuses), "statuses": dict(Counter(statuses)),
            "negative_drop_share": negative_drop_share(drops)}


def log_summary(summary: Mapping[str, Any]) -> None:
    share = summary["negative_drop_share"]
    logger.info(f"gsnr: scored {summary['rows']} rows; statuses {summary['statuses']}; "
                f"negative drop share {share if share is None else round(share, 3)}.")
    if share is not None and share > NEGATIVE_DROP_WARN_SHARE:
        logger.warning(
            f"gsnr: the gradient norm grew from the early to the late epoch for {share:.0%} of rows, so the "
            "drop mostly measures LoRA growth rather than learning (see docs/method.md). With lora_init: "
            "zero_b, switch to lora_init: random (the default); more rows per optimizer step also help."
        )
