"""The evaluation's input: Alpaca-style rows from JSON-lines files (a seeded sample of each), and the
rebuild of the shipped chatterbot data set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..jsonl import read_jsonl


def read_instruction_rows(paths: Sequence[str | Path], rows_per_file: Optional[int] = None, seed: int = 0,
              instruction_field: str = "instruction", output_field: str = "output") -> list[dict]:
    """Rows with a non-empty instruction and response from each file; at most `rows_per_file` of each
    (a seeded sample, kept in file order)."""
    rows: list[dict] = []
    for number, path in enumerate(paths):
        usable = [r for r in read_jsonl(path)
                  if isinstance(r.get(instruction_field), str) and r[instruction_field].strip()
                  and isinstance(r.get(output_field), str) and r[output_field].strip()]
        if rows_per_file is not None and len(usable) > rows_per_file:
            picked = np.random.default_rng([seed, number]).choice(len(usable), rows_per_file, replace=False)
            usable = [usable[i] for i in sorted(picked)]
        rows.extend(usable)
    return rows


def build_chatterbot(folder: str, out: Optional[str]) -> int:
    """Rebuild tools/data/chatterbot_english_qa.jsonl from the corpus' English YAML files."""
    import yaml

    seen, rows = set(), []
    for path in sorted(Path(folder).glob("*.yml")):
        category = path.stem
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for j, conv in enumerate(data.get("conversations") or []):
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                question, answer = conv[0].strip(), conv[1].strip()
                if question.lower() in seen or len(answer.split()) < 6:
                    continue
                seen.add(question.lower())
                rows.append({"id": f"chatterbot_{category}_{j}", "instruction": question, "input": "",
                             "output": answer, "source": f"chatterbot-corpus-1.3.3/english/{category}"})
    with open(out or "chatterbot_english_qa.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
