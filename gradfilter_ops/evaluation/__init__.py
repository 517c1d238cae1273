"""Selection-quality evaluation: how well does G-SNR keep corrupted rows out?

`gsnr-eval` (or `run(argv)`) injects known corruptions into real instruction data, scores every
row with G-SNR and with the usual baselines, and measures the separation:

1. Reads Alpaca-style jsonl (`instruction`, optional `input`, `output`; other field names through
   `--set instruction_field=...`) and corrupts a seeded `--corrupt-fraction` of the rows, kinds
   spread evenly: `swap`, `truncate`, `shuffle`, `repeat`, `echo`, `refusal` (`corrupt`).
2. Scores every row with: G-SNR (this package, the config given by `--set`), random, response
   length (longer kept), proxy perplexity (the proxy's mean response-token loss, lower kept), IFD
   with Superfiltering's rule (Data-Juicer's `instruction_following_difficulty_filter` on the same
   proxy; IFD >= 1 dropped, then the highest kept), and the paper's ablations: the plain gradient norm
   (smaller kept), the raw drop and the normalized drop without the variance term (`signals`,
   `baselines`).
3. Measures how each score separates clean from corrupted rows: AUROC (the chance that a random
   clean row outranks a random corrupted one; 0.5 is chance) with a bootstrap 95 % interval, and the
   share of corrupted rows among the top 10 % and 30 % kept. Overall and per corruption kind
   (`metrics`).
4. Trains the LoRA ensemble once, keeps every epoch's adapters, and takes the per-example gradient
   norms with respect to A and B separately (and, as an experiment, with respect to the adapted
   frozen weight W), so that `grad_params`, `norm`, `noise`, `eps`, the snapshot pair and
   `num_members` (the first M members are exactly what `num_members=M` trains) are all compared
   from one training run (`gradients`, `readings`).
5. Writes `report.md` (tables, `tables`), `roc.png` (ROC curves and G-SNR histograms, `plot`; needs
   matplotlib: `pip install 'gradfilter-ops[eval]'`), `scores.jsonl` (every row with every score),
   `readings.csv`, `summary.json`, and `norms.npz` + `meta.json` (the raw norms, so `--reuse`
   re-analyses without training again; `runs`).
"""

from .cli import main, run

__all__ = ["main", "run"]
