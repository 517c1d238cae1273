"""Content-addressed store of trained ensembles and per-example scores, for cheap re-runs and resume.

An entry is keyed by the scorer's fingerprint (proxy weights, config, seeds, package version) and the
fingerprint of the rows it trains on (the sorted hashes of their text fields), so any change that
could change a score makes a new entry and nothing stale is ever reused. Inside an entry:

    ensemble/member<m>_epoch<e>/   peft adapters, written as each member finishes training
    scores/part-<hash>.jsonl       score fields of one scored batch, keyed by example hash
    manifest.json                  versions, seeds, config, fingerprints, counts and timings

Every file is written to a temporary name and renamed, so a killed run leaves only whole files and
the next run resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


def digest(value: Any, length: int = 32) -> str:
    """Stable hex digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the result onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, value: Any) -> Path:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str))
    return path


class CacheEntry:
    """One (scorer, training rows) entry of the cache."""

    def __init__(self, root: str | os.PathLike, scorer_fingerprint: str, rows_fingerprint: str):
        self.dir = Path(root) / "scores" / f"{scorer_fingerprint[:16]}-{rows_fingerprint[:16]}"
        self.ensemble_dir = self.dir / "ensemble"
        self._scores: dict[str, dict] | None = None

    def scores(self) -> dict[str, dict]:
        """Every cached example hash -> score fields (read once per process)."""
        if self._scores is None:
            self._scores = {}
            for part in sorted((self.dir / "scores").glob("part-*.jsonl")):
                with part.open(encoding="utf-8") as f:
                    for line in f:
                        record = json.loads(line)
                        self._scores[record.pop("key")] = record
        return self._scores

    def add_scores(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Persist the scores of one batch as one shard, then make them visible to this process."""
        if not records:
            return
        lines = "".join(json.dumps({"key": key, **record}, ensure_ascii=False) + "\n" for key, record in records.items())
        atomic_write_text(self.dir / "scores" / f"part-{digest(sorted(records))}.jsonl", lines)
        self.scores().update({key: dict(record) for key, record in records.items()})

    def has_all(self, keys: Iterable[str]) -> bool:
        cached = self.scores()
        return all(key in cached for key in keys)

    def write_manifest(self, manifest: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.dir / "manifest.json", manifest)
