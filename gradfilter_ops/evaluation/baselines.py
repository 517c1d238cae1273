"""The baselines G-SNR is compared with, on the same proxy: its perplexity, and IFD with
Superfiltering's rule through Data-Juicer's own `instruction_following_difficulty_filter`."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np


def proxy_losses(model, examples, pad_id: int, batch_size: int, precision: str) -> np.ndarray:
    """Mean response-token loss of each example under the bare proxy (log perplexity)."""
    import torch

    from ..engine.grads import collate, length_buckets, response_loss_sums
    from ..precision import autocast, resolve as resolve_precision

    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(precision, device).autocast_dtype
    out = np.zeros(len(examples))
    with torch.no_grad():
        for indices in length_buckets([len(e.input_ids) for e in examples], batch_size):
            batch = collate([examples[i] for i in indices], pad_id, device)
            with autocast(device, autocast_dtype):
                sums, counts = response_loss_sums(model, batch)
            out[indices] = (sums / counts.clamp_min(1)).double().cpu().numpy()
    return out


def ifd_scores(rows: Sequence[Mapping[str, Any]], prompts: Sequence[str], folder: str, output_field: str,
               max_length: Optional[int] = None, progress: bool = True) -> np.ndarray:
    """IFD of every row from Data-Juicer's own `instruction_following_difficulty_filter`.

    The query is the same Alpaca prompt the G-SNR proxy sees; the op joins it and the response with
    a space and takes loss(response | query) / loss(response) from the proxy, one row at a time.
    With `max_length`, the op cuts both texts to that many tokens (the full text from the left).
    """
    from data_juicer.ops.filter.instruction_following_difficulty_filter import InstructionFollowingDifficultyFilter
    from data_juicer.utils.constant import Fields, StatsKeys
    from tqdm.auto import tqdm

    op = InstructionFollowingDifficultyFilter(hf_model=folder, min_score=0.0, max_score=1.0,
                                              query_template="{eval_query}",
                                              response_template="{" + output_field + "}")
    if max_length:
        # `_loss` reads max_length from model_params, but the op also hands model_params to
        # from_pretrained, which rejects it; so it is set after the model loader was prepared.
        op.model_params = {**op.model_params, "max_length": max_length}
    out = np.full(len(rows), np.nan)
    for i, (row, prompt) in enumerate(tqdm(list(zip(rows, prompts)), desc="eval: IFD (Data-Juicer)",
                                           disable=not progress, mininterval=30)):
        sample = {**row, "eval_query": prompt, Fields.stats: {}}
        out[i] = float(op.compute_stats_single(sample)[Fields.stats][StatsKeys.ifd_score])
    return out


def superfiltering_keep_score(ifd: np.ndarray) -> np.ndarray:
    """Superfiltering's rule as a keep-score: IFD >= 1 (or missing) is dropped, else higher is kept."""
    ifd = np.asarray(ifd, dtype=np.float64)
    return np.where(np.isfinite(ifd) & (ifd < 1), ifd, -np.inf)
