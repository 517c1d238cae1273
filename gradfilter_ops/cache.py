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
and each adapter folder has a `checksums.json` (`write_checksums`). Each of these also names the
entry it was written for (`CacheEntry.key`), inside what its hash covers, so a file copied from an
entry with other options or rows fails as a damaged one does. A file that fails its check is logged
with its path and left out (`DamagedCacheFile`), so what it held is computed again.
"""

from __future__ import annotations

import errno
import hashlib
import copy
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from loguru import logger

SHA256 = "sha256"  # the key of a file's own hash in a sealed JSON file and a shard's first line
CHECKSUMS = "checksums.json"  # in a folder: the SHA-256 of each of its files, and the folder's name
ENTRY = "entry"  # in a cache file's checked content: the key of the cache entry it was written for


class DamagedCacheFile(ValueError):
    """A cache file that is unreadable, truncated, or not what was written (its hash does not match)."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"damaged cache file {path}: {why}")
        self.path = Path(path)



class CacheFullError(OSError):
    """The disk of `cache_dir` is full (or its quota spent): what the cache holds so far stays, whole."""


# errno of a write that found no room: the disk is full, or the user's quota is spent.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def room_for(root: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a write under cache folder `root` that finds no room into a `CacheFullError` that names the folder,
    what was being written, and the fixes."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_ROOM or isinstance(error, CacheFullError):
            raise
        raise CacheFullError(error.errno, f"cache_dir {root}: no space left on its disk while writing {what} "
                             f"({error.filename or error.strerror}). Free space there, set `cache_dir` (or "
                             "$GRADFILTER_CACHE_DIR) to a folder on a disk with room, or set `use_cache: false`; "
                             "the members and scores already written are kept, so a re-run resumes from them."
                             ) from error


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


def write_checksums(folder: Path, entry: str | None = None) -> None:
    """Record the SHA-256 of every file in `folder`, the folder's name and the cache entry it belongs to
    (`entry`, when it is in one) in `folder/checksums.json`."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    write_sealed_json(folder / CHECKSUMS, {"name": folder.name, "files": files, **entry_record(entry)})


def verify_checksums(folder: Path, name: str | None = None, entry: str | None = None) -> None:
    """Check `folder` against its `checksums.json` (written by `write_checksums`, as folder `name` of cache
    entry `entry`)."""
    record = read_sealed_json(folder / CHECKSUMS)
    if record.get("name") != (name or folder.name):
        raise DamagedCacheFile(folder, f"holds the files of {record.get('name')!r}")
    check_entry(folder, record, entry)
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS}
    if present != set(record["files"]):
        raise DamagedCacheFile(folder, f"files {sorted(present)} instead of {sorted(record['files'])}")
    for file, expected in record["files"].items():
        if sha256_file(folder / file) != expected:
            raise DamagedCacheFile(folder / file, "content does not match its hash")


def entry_record(entry: str | None) -> dict[str, str]:
    """The field that names the cache entry a file belongs to (none outside an entry)."""
    return {} if entry is None else {ENTRY: entry}


def check_entry(path: str | os.PathLike, record: Mapping[str, Any], entry: str | None) -> None:
    """`DamagedCacheFile` unless `record` (a file's checked content) was written for cache entry `entry`."""
    if record.get(ENTRY) != entry:
        raise DamagedCacheFile(path, f"was written for cache entry {record.get(ENTRY)!r}, not this one ({entry!r}): "
                                     "copied from another entry (other options or rows)")


def report_damaged(error: DamagedCacheFile, what: str) -> None:
    logger.warning(f"gsnr: {error}; {what}")


class CacheEntry:
    """One (scorer, training rows) entry of the cache."""

    def __init__(self, root: str | os.PathLike, scorer_fingerprint: str, rows_fingerprint: str):
        self.key = f"{scorer_fingerprint}-{rows_fingerprint}"  # named inside every file the entry holds
        self.root = Path(root)
        self.dir = self.root / "scores" / f"{scorer_fingerprint[:16]}-{rows_fingerprint[:16]}"
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
                    self._scores.update(read_shard(part, self.key))
                except DamagedCacheFile as error:
                    report_damaged(error, "its rows are scored again.")
                    part.unlink(missing_ok=True)
        return self._scores

    def add_scores(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Persist the scores of one batch as one shard, then make them visible to this process."""
        if not records:
            return
        lines = "".join(json.dumps({"key": key, **record}, ensure_ascii=False) + "\n"
                        for key, record in records.items())
        header = json.dumps({ENTRY: self.key, SHA256: sha256_text(shard_text(self.key, lines))}) + "\n"
        with room_for(self.root, "a score shard"):
            atomic_write_text(self.dir / "scores" / f"part-{digest(sorted(records))}.jsonl", header + lines)
        self.scores().update({key: dict(record) for key, record in records.items()})

    def relocated(self, root: str | os.PathLike) -> "CacheEntry":
        """The same entry under another cache root (another node's `cache_dir`): the scores there, and those
        this entry has read so far."""
        moved = copy.copy(self)
        moved.root = Path(root)
        moved.dir = moved.root / "scores" / self.dir.name
        moved.ensemble_dir, moved.embeddings_dir = moved.dir / "ensemble", moved.dir / "embeddings"
        moved._scores = None
        if self._scores:
            moved.scores().update(self._scores)
        return moved

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
        with room_for(self.root, "the run manifest"):
            return atomic_write_json(self.dir / "manifest.json", manifest)


def shard_text(entry: str, lines: str) -> str:
    """What a shard's hash covers: its rows and the key of the entry they were scored for."""
    return json.dumps({ENTRY: entry}) + "\n" + lines


def read_shard(path: Path, entry: str) -> dict[str, dict]:
    """Example hash -> score fields of one shard of cache entry `entry`, checked against the hash on its
    first line."""
    try:
        header, _, lines = path.read_text(encoding="utf-8").partition("\n")
        header = json.loads(header) if header.startswith("{") else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCacheFile(path, f"unreadable ({error})") from error
    expected = header.get(SHA256) if isinstance(header, dict) else None
    if expected is None:
        raise DamagedCacheFile(path, "no content hash")
    check_entry(path, header, entry)
    if sha256_text(shard_text(entry, lines)) != expected:
        raise DamagedCacheFile(path, "content does not match its hash")
    records = {}
    for line in lines.splitlines():
        record = json.loads(line)
        records[record.pop("key")] = record
    return records
