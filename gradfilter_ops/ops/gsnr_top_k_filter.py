"""The `gsnr_top_k_filter` Data-Juicer op: keep the rows with the highest G-SNR."""

from __future__ import annotations

from collections import Counter
from typing import Optional

from data_juicer.ops.base_op import OPERATORS, Selector
from data_juicer.utils.constant import Fields
from loguru import logger

from .. import fields
from ..selection import select_top_k, validate_k_or_ratio

OP_NAME = "gsnr_top_k_filter"


@OPERATORS.register_module(OP_NAME)
class GSNRTopKFilter(Selector):
    """Keeps the `top_k` samples, or the `top_ratio` share of them, with the highest `gsnr`.

    It reads the stats that `gsnr_scorer` writes, so put `gsnr_scorer` before it. Set exactly one of
    `top_k` and `top_ratio`; a ratio keeps floor(top_ratio x N) rows (at least one), and a `top_k`
    above N keeps all N. Ties are broken by dataset order. Rows without a finite score (see
    `gsnr_status`) rank last, so they are kept only when the budget exceeds the scored rows. The
    kept rows stay in their original order. The log counts the dropped rows by reason.

    Recipe step:

        - gsnr_top_k_filter:
            top_ratio: 0.1
    """

    def __init__(self, top_k: Optional[int] = None, top_ratio: Optional[float] = None, *args, **kwargs):
        """
        Initialization method.

        :param top_k: number of rows to keep.
        :param top_ratio: share of rows to keep, in (0, 1].
        """
        super().__init__(*args, **kwargs)
        validate_k_or_ratio(top_k, top_ratio)
        self.top_k = top_k
        self.top_ratio = top_ratio

    def process(self, dataset):
        if len(dataset) == 0:
            logger.warning(f"{OP_NAME}: the dataset is empty; nothing to select.")
            return dataset
        stats = dataset[Fields.stats] if Fields.stats in dataset.column_names else []
        if not stats or any(not s or s.get(fields.STATUS) is None for s in stats):
            raise ValueError(
                f"{OP_NAME} needs the G-SNR stats of every row: put a `gsnr_scorer` step before it in the recipe."
            )
        keep = select_top_k([s[fields.GSNR] for s in stats], self.top_k, self.top_ratio)
        kept = set(keep)
        dropped = Counter(
            "below_top_k_cutoff" if s[fields.STATUS] == fields.OK else s[fields.STATUS]
            for i, s in enumerate(stats) if i not in kept
        )
        logger.info(f"{OP_NAME}: kept {len(keep)} of {len(stats)} rows; dropped by reason: {dict(dropped)}.")
        return dataset.select(keep)
