"""The run manifest: what a scoring run needs to be reproduced (versions, seeds, options,
fingerprints, row counts, the summary and the timings)."""

from __future__ import annotations

import platform
from typing import Any

PACKAGES = ("gradfilter-ops", "torch", "transformers", "peft", "datasets", "py-data-juicer")


def own_version() -> str:
    """This package's installed version ("0.0.0+unknown" in a source tree that was not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradfilter-ops")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def package_versions() -> dict[str, Any]:
    """Python's version and that of each package in `PACKAGES` (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def run_manifest(scorer) -> dict[str, Any]:
    """The manifest of a `GSNRScorer` run."""
    config = scorer.config
    return {
        "versions": package_versions(),
        "config": config.to_dict(),
        "precision": scorer.precision.to_dict() if scorer.precision is not None else None,
        "member_seeds": [config.seed + m for m in range(config.num_members)],
        "scorer_fingerprint": scorer.fingerprint,
        "cache_entry": str(scorer.cache.dir) if scorer.cache else None,
        "rows": scorer.counts,
        "summary": scorer.summary,
        "timings_s": {k: round(v, 3) for k, v in scorer.timings.items()},
    }
