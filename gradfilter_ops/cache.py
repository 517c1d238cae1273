"""Content-addressed store of trained ensembles and per-example scores, for cheap re-runs and resume.

An entry is keyed by the scorer's fingerprint (proxy weights, config, seeds, package version) and the
fingerprint of the rows it trains on (the sorted hashes of their text fields), so any change that
could change a score makes a new entry and nothing stale is ever reused. Inside an entry:

    ensemble/member<m>_epoch<e>/   peft adapters, written as each member finishes training
    scores/part-<hash>.jsonl       score fields of one scored batch, keyed by example hash
    embeddings/                    the proxy's pooled hidden states of the rows (`vectors.npy`, their
                                   example hashes in `keys.json`), for the row groups (`clusters`)
    manifest.json                  versions, seeds, config, fingerprints, counts and timings

Every file is written to a temporary name and renamed, so a killed run leaves only whole files and
the next run resumes from them. Every file is also checked when it is read: a score shard starts with
the SHA-256 of the rest of it, a JSON file (`ensemble.json`) carries the SHA-256 of its own content,
and each adapter folder has a `checksums.json` (`write_checksums`). A file that fails its check is
logged with its path and left out (`DamagedCacheFile`), so what it held is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from loguru import logger

SHA256 = "sha256"  # the key of a file's own hash in a sealed JSON file and a shard's first line
CHECKSUMS = "checksums.json"  # in a folder: the SHA-256 of each of its files, and the folder's name


class DamagedCacheFile(ValueError):
    """A cache file that is unreadable, truncated, or not what was written (its hash does not match)."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"damaged cache file {path}: {why}")
        self.path = Path(path)



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


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=list)


def write_sealed_json(path: Path, value: Mapping[str, Any]) -> Path:
    """Write a JSON object with the SHA-256 of its content under `sha256`, atomically."""
    plain = json.loads(_canonical(dict(value)))  # as it reads back: tuples and sets become lists
    atomic_write_text(path, _canonical({**plain, SHA256: sha256_text(_canonical(plain))}))
    return path


def read_sealed_json(path: str | os.PathLike) -> dict[str, Any]:
    """The object `write_sealed_json` wrote; `DamagedCacheFile` when it is unreadable or was changed."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCacheFile(path, f"unreadable ({error})") from error
    if not isinstance(value, dict) or SHA256 not in value:
        raise DamagedCacheFile(path, "no content hash")
    expected = value.pop(SHA256)
    if sha256_text(_canonical(value)) != expected:
        raise DamagedCacheFile(path, "content does not match its hash")
    return value


def write_checksums(folder: Path) -> None:
    """Record the SHA-256 of every file in `folder`, and the folder's name, in `folder/checksums.json`."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    write_sealed_json(folder / CHECKSUMS, {"name": folder.name, "files": files})


def verify_checksums(folder: Path, name: str | None = None) -> None:
    """Check `folder` against its `checksums.json` (written by `write_checksums`, as folder `name`)."""
    record = read_sealed_json(folder / CHECKSUMS)
    if record.get("name") != (name or folder.name):
        raise DamagedCacheFile(folder, f"holds the files of {record.get('name')!r}")
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS}
    if present != set(record["files"]):
        raise DamagedCacheFile(folder, f"files {sorted(present)} instead of {sorted(record['files'])}")
    for file, expected in record["files"].items():
        if sha256_file(folder / file) != expected:
            raise DamagedCacheFile(folder / file, "content does not match its hash")


def report_damaged(error: DamagedCacheFile, what: str) -> None:
    logger.warning(f"gsnr: {error}; {what}")


class CacheEntry:
    """One (scorer, training rows) entry of the cache."""

    def __init__(self, root: str | os.PathLike, scorer_fingerprint: str, rows_fingerprint: str):
        self.dir = Path(root) / "scores" / f"{scorer_fingerprint[:16]}-{rows_fingerprint[:16]}"
        self.ensemble_dir = self.dir / "ensemble"
        self.embeddings_dir = self.dir / "embeddings"
        self._scores: dict[str, dict] | None = None

    def scores(self) -> dict[str, dict]:
        """Every cached example hash -> score fields (read once per process); a damaged shard is
        logged, deleted and left out, so its rows are scored again."""
        if self._scores is None:
            self._scores = {}
            for part in sorted((self.dir / "scores").glob("part-*.jsonl")):
                try:
                    self._scores.update(read_shard(part))
                except DamagedCacheFile as error:
                    report_damaged(error, "its rows are scored again.")
                    part.unlink(missing_ok=True)
        return self._scores

    def add_scores(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Persist the scores of one batch as one shard, then make them visible to this process."""
        if not records:
            return
        lines = "".join(json.dumps({"key": key, **record}, ensure_ascii=False) + "\n" for key, record in records.items())
        header = json.dumps({SHA256: sha256_text(lines)}) + "\n"
        atomic_write_text(self.dir / "scores" / f"part-{digest(sorted(records))}.jsonl", header + lines)
        self.scores().update({key: dict(record) for key, record in records.items()})

    def has_all(self, keys: Iterable[str]) -> bool:
        cached = self.scores()
        return all(key in cached for key in keys)

    def embeddings(self):
        """`(keys, vectors)`: the cached pooled hidden states (float32 [len(keys), hidden]) and the example
        hashes of their rows, or None when there are none; a damaged file is logged and deleted (None)."""
        import numpy as np

        folder = self.embeddings_dir
        if not folder.exists():
            return None
        try:
            verify_checksums(folder)
            keys = json.loads((folder / "keys.json").read_text(encoding="utf-8"))
            vectors = np.load(folder / "vectors.npy", allow_pickle=False)
            if len(keys) != len(vectors):
                raise DamagedCacheFile(folder, f"{len(keys)} keys for {len(vectors)} vectors")
        except (DamagedCacheFile, OSError, ValueError) as error:
            damaged = error if isinstance(error, DamagedCacheFile) else DamagedCacheFile(folder, repr(error))
            report_damaged(damaged, "the pooled hidden states are computed again.")
            for file in folder.iterdir():
                file.unlink(missing_ok=True)
            return None
        return keys, vectors

    def add_embeddings(self, keys: Sequence[str], vectors) -> None:
        """Keep the pooled hidden states `vectors` of the rows `keys` (replacing any), with their checksums."""
        import numpy as np

        folder = self.embeddings_dir
        (folder / CHECKSUMS).unlink(missing_ok=True)  # the files below are not whole until it is written again
        atomic_write_text(folder / "keys.json", json.dumps(list(keys)))

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(vectors, dtype=np.float32), allow_pickle=False)

        atomic_write(folder / "vectors.npy", save)
        write_checksums(folder)

    def write_manifest(self, manifest: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.dir / "manifest.json", manifest)


def read_shard(path: Path) -> dict[str, dict]:
    """Example hash -> score fields of one shard, checked against the hash on its first line."""
    try:
        header, _, lines = path.read_text(encoding="utf-8").partition("\n")
        expected = json.loads(header).get(SHA256) if header.startswith("{") else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCacheFile(path, f"unreadable ({error})") from error
    if expected is None:
        raise DamagedCacheFile(path, "no content hash")
    if sha256_text(lines) != expected:
        raise DamagedCacheFile(path, "content does not match its hash")
    records = {}
    for line in lines.splitlines():
        record = json.loads(line)
        records[record.pop("key")] = record
    return records
