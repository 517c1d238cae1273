"""Data-Juicer ops. Importing this module registers them; Data-Juicer does so through the
`data_juicer.ops` entry point that `pip install` declares."""

from .gsnr_scorer import GSNRScorerOp
from .gsnr_top_k_filter import GSNRTopKFilter
from .ray_ops import RayGSNRScorerOp, RayGSNRTopKFilter

__all__ = ["GSNRScorerOp", "GSNRTopKFilter", "RayGSNRScorerOp", "RayGSNRTopKFilter"]
