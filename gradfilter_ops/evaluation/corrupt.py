"""Known corruptions injected into clean rows: `swap` (another row's response), `truncate` (the first
30 % of the words), `shuffle` (words in random order), `repeat` (the first words looped), `echo` (the
prompt copied back), `refusal` (a canned "as an AI I cannot" reply)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

KINDS = ("swap", "truncate", "shuffle", "repeat", "echo", "refusal")
CLEAN = "clean"
TRUNCATE_KEEP = 0.3  # share of the words a truncated response keeps
REPEAT_PHRASE_WORDS = 6  # a degenerate response loops its first words
REFUSALS = (
    "I'm sorry, but as an AI language model, I cannot help with that request.",
    "As an AI language model, I do not have personal opinions or the ability to do that.",
    "I apologize, but I am unable to provide an answer to this question.",
    "Sorry, I can't assist with that.",
    "I'm sorry, I don't understand the question. Could you please rephrase it?",
)


def _words(text: str) -> list[str]:
    return text.split()


def corrupt_response(kind: str, response: str, prompt: str, rng: np.random.Generator,
                     donor: Optional[str] = None) -> str:
    """The corrupted response of one row. Every kind returns text that differs from `response`."""
    words = _words(response)
    if kind == "swap":
        if donor is None or donor.strip() == response.strip():
            raise ValueError("`swap` needs a donor response that differs from the row's own.")
        return donor
    if kind == "truncate":
        if len(words) >= 2:
            return " ".join(words[: max(1, int(len(words) * TRUNCATE_KEEP))])
        return response.strip()[: max(1, len(response.strip()) // 3)]
    if kind == "shuffle":
        units = words if len(set(words)) >= 2 else list(response.strip())
        joiner = " " if len(set(words)) >= 2 else ""
        if len(set(units)) < 2:
            return response + " " + response  # nothing to shuffle: degenerate anyway
        for _ in range(100):
            order = rng.permutation(len(units))
            shuffled = [units[i] for i in order]
            if shuffled != units:
                return joiner.join(shuffled)
        return joiner.join(reversed(units))
    if kind == "repeat":
        phrase = words[:REPEAT_PHRASE_WORDS] or [response.strip()]
        times = max(3, math.ceil(len(words) / len(phrase)))
        return " ".join(phrase * times)
    if kind == "echo":
        return prompt
    if kind == "refusal":
        choices = [r for r in REFUSALS if r != response.strip()]
        return choices[int(rng.integers(len(choices)))]
    raise ValueError(f"Unknown corruption kind {kind!r}; known: {list(KINDS)}.")


def corrupt_dataset(rows: Sequence[Mapping[str, Any]], fraction: float, seed: int,
                    kinds: Sequence[str] = KINDS, instruction_field: str = "instruction",
                    input_field: str = "input", output_field: str = "output") -> list[dict]:
    """A copy of `rows` in which round(fraction * N) seeded rows are corrupted, the kinds spread evenly.

    Each row gets `eval_corruption` (`clean` or the kind), `eval_index` (its position) and, when
    corrupted, `eval_original_output`. A swapped response comes from the original response of another
    row. The same rows, kinds and seed give the same result.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"--corrupt-fraction must be in [0, 1), got {fraction}.")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"Unknown corruption kind {kind!r}; known: {list(KINDS)}.")
    rng = np.random.default_rng(seed)
    n = len(rows)
    n_bad = int(round(fraction * n))
    bad = rng.choice(n, n_bad, replace=False) if n_bad else np.array([], dtype=int)
    assigned = [kinds[i % len(kinds)] for i in range(n_bad)]
    assigned = [assigned[i] for i in rng.permutation(n_bad)]
    kind_of = {int(i): k for i, k in zip(bad, assigned)}
    originals = [str(r[output_field]) for r in rows]
    out = []
    for i, row in enumerate(rows):
        new = dict(row)
        new["eval_index"] = i
        kind = kind_of.get(i, CLEAN)
        new["eval_corruption"] = kind
        if kind != CLEAN:
            instruction = str(row[instruction_field])
            context = row.get(input_field)
            prompt = instruction + (f"\n{context}" if isinstance(context, str) and context.strip() else "")
            donor = None
            if kind == "swap":
                candidates = [j for j in range(n) if j != i and originals[j].strip() != originals[i].strip()]
                donor = originals[candidates[int(rng.integers(len(candidates)))]]
            new[output_field] = corrupt_response(kind, originals[i], prompt, rng, donor)
            new["eval_original_output"] = originals[i]
        out.append(new)
    return out
