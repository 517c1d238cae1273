"""Small shared helpers for the tests (fixtures live in conftest.py)."""

import json
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "self_instruct_seed_tasks.jsonl"


def seed_tasks(n: int) -> list[dict]:
    """The first n self-instruct seed tasks (real instruction data shipped for the demo)."""
    with DEMO_DATA.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]
