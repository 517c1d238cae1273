"""G-SNR on Ray Data, for datasets that one machine cannot score in time. Data-Juicer's Ray executor
runs it through `ray_gsnr_scorer` and `ray_gsnr_top_k_filter`; it works on any `ray.data.Dataset`:

    import ray
    from gradfilter_ops import GSNRScorer
    from gradfilter_ops.distributed import score_dataset, select_dataset

    scored = score_dataset(GSNRScorer(hf_model="openai-community/gpt2"), ray.data.read_json("data.jsonl"),
                           concurrency=8, train_tasks=4)
    kept = select_dataset(scored.dataset, top_ratio=0.1).dataset

- Training: the members are split over `train_tasks` Ray tasks (a GPU each when the cluster has
  GPUs). Each task reads every row, as the method needs, and trains its members as `GSNRScorer.fit`
  would (member m seeds with seed + m), so the ensemble does not depend on the split.
- Scoring: a pool of `concurrency` Ray actors maps over the blocks, one batch in flight each; each
  loads the proxy once and gets the trained adapters through Ray's object store, not through
  `cache_dir` (each node writes its score shards to the cache folder it resolves itself). Where every
  row already carries its score, Ray tasks write the group fields and no actor starts. An actor or
  node that dies is restarted and its batches retried by Ray Data; every row must come back exactly
  once, else `LostRows` names the rows lost or doubled (`completeness`).
- Selection: a few numbers per row (score, status, tokens, group) come to the driver, the selection
  is `selection.select` over them in block order, and each block is cut where it lies. Dropped rows
  stream to one JSON-lines file, a block at a time.

Scores go into the columns of `fields.SCORE_FIELDS`, or into a struct column (`stats_column`, which
Data-Juicer calls `__dj__stats__`) with `gsnr_ensemble` and a `gsnr_proof` (`provenance`), where a row
whose stats carry a proof from this scorer keeps its score while every score comes from one ensemble;
other stats are scored again.
"""

from .blocks import add_scores, read_fields
from .completeness import LostRows
from .scoring import Scored, score_dataset
from .selection import MissingScores, Selected, select_dataset, split_rows
from .training import fit_dataset

__all__ = ["LostRows", "MissingScores", "Scored", "Selected", "add_scores", "fit_dataset", "read_fields",
           "score_dataset", "select_dataset", "split_rows"]
