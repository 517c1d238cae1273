"""Data-Juicer ops. Importing this module registers them, and has Data-Juicer's loader check the input of a
recipe with a G-SNR step first (`_recipe`); Data-Juicer imports it through the `data_juicer.ops` entry point
that `pip install` declares."""

from .gsnr_scorer import GSNRScorerOp
from .gsnr_top_k_filter import GSNRTopKFilter
from .ray_ops import RayGSNRScorerOp, RayGSNRTopKFilter
from ._recipe import install_input_check

install_input_check()

__all__ = ["GSNRScorerOp", "GSNRTopKFilter", "RayGSNRScorerOp", "RayGSNRTopKFilter"]
