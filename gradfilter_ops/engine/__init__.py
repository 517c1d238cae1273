"""How G-SNR is computed: the LoRA ensemble on one frozen proxy, trained (phase 1), its per-example
gradient norms (phase 2) and the formula (phase 3).

- `snapshots`: `Snapshots`, each member's adapter after the kept epochs (by default the early and
  the late one), as plain peft adapter folders that can be saved, shipped and loaded.
- `policy`: what the ensemble is built from a `GSNRConfig` (`lora_config`, `prefix_split`,
  `stack_size`, `adapters_per_pass`).
- `training`: `EnsembleTrainer` (and `train_ensemble`), which trains members one at a time,
  `stack_members` at a time in one stacked forward (`stacking.StackedLora`), or `member_workers` at a
  time in worker processes, with the same arithmetic. With `score_mode: online` its steps also record
  every training row's squared gradient norm (`Snapshots.online_norms`), so no scoring pass is needed.
- `scoring`: `EnsembleScorer` reads the snapshots and never trains; `PooledEnsembleScorer` runs it in
  worker processes; `ensemble_scorer` picks one.
- `workers`: the process pool both use, sharing the frozen proxy.
- `grads`: exact per-example squared gradient norms of the LoRA parameters in one batched pass;
  `head`: the frozen LM head's fused loss; `prefix`: the frozen layers below the adapters, run once;
  `stacking`: several members in one forward; `peft_internals`: every access to peft beyond its
  public API, with the check of the installed peft's version.
- `gsnr`: the formula, drop over noise, and the negative-drop share.
"""

from importlib import import_module

# Loaded on first use, so that importing `gradfilter_ops` (which needs only the formula) does not import torch.
_SUBMODULE = {"adapters_per_pass": "policy", "lora_config": "policy", "prefix_split": "policy", "stack_size": "policy",
              "EnsembleScorer": "scoring", "PooledEnsembleScorer": "scoring", "ensemble_scorer": "scoring",
              "MANIFEST": "snapshots", "ONLINE_NORMS": "snapshots", "Snapshots": "snapshots",
              "adapter_name": "snapshots", "EnsembleTrainer": "training", "train_ensemble": "training"}
__all__ = sorted(_SUBMODULE)


def __getattr__(name: str):
    if name in _SUBMODULE:
        return getattr(import_module(f".{_SUBMODULE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
