"""`gradfilter_ops.distributed` on a Ray cluster of two nodes (`ray.cluster_utils.Cluster` on this machine: one
CPU, one temp folder and one cache folder each, nothing shared): members, scoring actors and cache files on both
nodes, a scoring actor killed in the middle of a batch, and rows lost past Ray's retries (a worker node removed in
the middle of a batch: `tests/test_ray_node_loss.py`, on a cluster of its own).

The cluster starts once for the module (slow on 2 cores). The scorer is the real `GSNRScorer` with two hooks of
the test's own (`RecordedScorer`): it tells a ledger actor on which node it trained and scored (node ids from
`ray.get_runtime_context()`), and it waits in the batch the ledger picks, so that the test kills its actor with
`ray.kill` (or removes its node) at a known point instead of by timing; the scorer never exits or fails by
itself, except where the ledger is told to fail a batch (the unrecoverable case)."""

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from datasets import Dataset

from gradfilter_ops import GSNRScorer, fields
from gradfilter_ops.config import GSNRConfig
from gradfilter_ops.presets import CACHE_ENV_VAR
from gradfilter_ops.selection import select

from helpers import seed_tasks

# One worker runs the whole file (`--dist loadgroup`): its module fixtures (its Ray cluster) are built once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_ray_cluster")]

ray = pytest.importorskip("ray")
STATS = "__dj__stats__"
ROWS = seed_tasks(18) + [{"id": "bad_empty", "instruction": "Say something.", "input": "", "output": " "},
                         {"id": "bad_missing", "instruction": "Say something.", "input": None}]
BLOCKS = 4  # of 5 rows: one scoring batch each
HOLD_S = 240  # how long a held batch waits to be killed before it fails the test


@ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})  # stays when the worker node goes
class Ledger:
    """Where the test's scorer trained and scored, and the batch it holds for the test to kill (`hold`: the
    first batch on any node, or on the node of that id) or fails every time (`fail_id`: the batch holding
    that row). With `spread`, a scorer returns no batch until that many nodes have scored one (so both nodes
    score, whichever actor starts first)."""

    def __init__(self, hold=None, fail_id=None, spread=1):
        self.hold, self.fail_id, self.spread = hold, fail_id, spread
        self.trained, self.scored, self.held = [], [], None

    def train(self, node: str, members: list) -> None:
        self.trained.append((node, members))

    def score(self, node: str, ids: list, actor) -> str:
        """Record a scored batch; say what the scorer does next: "return", "hold" (to be killed) or "fail"."""
        self.scored.append((node, ids))
        if self.fail_id in ids:
            return "fail"
        if self.hold in ("any", node) and self.held is None:
            self.held = (actor, ids)
            return "hold"
        return "return"

    def held_batch(self):
        return self.held

    def spread_reached(self) -> bool:
        return len({node for node, _ in self.scored}) >= self.spread

    def records(self):
        return self.trained, self.scored


class RecordedScorer(GSNRScorer):
    """The real scorer, reporting to `ledger` where it trains and scores, and holding or failing the batch the
    ledger says (after scoring it, so a held batch dies with its work done but not returned)."""

    ledger = None

    def fit(self, dataset, batch_size=1000, members=None):
        fitted = super().fit(dataset, batch_size, members)
        ray.get(self.ledger.train.remote(ray.get_runtime_context().get_node_id(), list(members)))
        return fitted

    def score_batch(self, batch, rank=None):
        out = super().score_batch(batch, rank)
        context = ray.get_runtime_context()
        verdict = ray.get(self.ledger.score.remote(context.get_node_id(), list(batch["id"]), context.current_actor))
        if verdict == "fail":
            raise RuntimeError("the test fails this batch on every try")
        if verdict == "hold":
            time.sleep(HOLD_S)
            raise RuntimeError(f"the held batch was not killed in {HOLD_S} s")
        deadline = time.monotonic() + HOLD_S
        while not ray.get(self.ledger.spread_reached.remote()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the other node scored no batch in {HOLD_S} s")
            time.sleep(0.2)
        return out


def config(model_dir, **overrides) -> GSNRConfig:
    """The tiny proxy as in `conftest.tiny_config`; `cache_dir` left to each node (`$GRADFILTER_CACHE_DIR`)."""
    values = dict(hf_model=str(model_dir), cache_dir=None, device="cpu", precision="fp32", num_members=2,
                  train_batch_size=4, score_batch_size=4, max_length=96, learning_rate=1e-3, use_cache=True,
                  score_mode="snapshot")
    values.update(overrides)
    return GSNRConfig(**values)


class TwoNodes:
    """A local Ray cluster (`ray.cluster_utils.Cluster`) and each node's cache folder, by node id."""

    def __init__(self, root: Path):
        from ray.cluster_utils import Cluster

        self.root, self.cluster, self.caches, self.worker = root, Cluster(), {}, None

    def add(self, name: str):
        """A node of one CPU with its own temp folder and cache folder (`$GRADFILTER_CACHE_DIR`)."""
        extra = {} if self.cluster.head_node is not None else {
            "include_dashboard": False,
            # A removed node is found dead in about 2 s, not Ray's default of 15 s or more.
            "_system_config": {"health_check_initial_delay_ms": 500, "health_check_period_ms": 500,
                               "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}}
        node = self.cluster.add_node(num_cpus=1, temp_dir=str(self.root / name), **extra,
                                     env_vars={CACHE_ENV_VAR: str(self.root / name / "cache")})
        self.caches[node.node_id] = self.root / name / "cache"
        return node


@pytest.fixture(scope="module")
def two_nodes():
    """A local Ray cluster of two nodes (`TwoNodes`), the driver connected."""
    root = Path(tempfile.mkdtemp(prefix="gsnr-ray-", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    saved = {name: os.environ.get(name) for name in ("RAY_TMPDIR", CACHE_ENV_VAR)}
    os.environ["RAY_TMPDIR"] = str(root)  # Ray's address file goes here, not to the machine's /tmp/ray
    os.environ[CACHE_ENV_VAR] = str(root / "driver" / "cache")
    (root / "ray").mkdir()
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the workers cannot import the tests folder
    nodes = TwoNodes(root)
    try:
        nodes.add("head")
        nodes.worker = nodes.add("worker")
        ray.init(address=nodes.cluster.address, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.cluster.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(module)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def one_process(tiny_gpt2_dir):
    """The rows scored by the `datasets` API in this process, by id."""
    scored = GSNRScorer(config(tiny_gpt2_dir, use_cache=False)).score(Dataset.from_list(ROWS))
    return {row["id"]: row for row in scored}


def run_on_the_cluster(nodes: TwoNodes, model_dir, ledger, **options):
    """`score_dataset` of `ROWS` on the two nodes, their caches emptied first (each test trains and scores)."""
    from gradfilter_ops.distributed import score_dataset

    for cache in nodes.caches.values():
        shutil.rmtree(cache / "scores", ignore_errors=True)
    scorer = RecordedScorer(config(model_dir))
    scorer.ledger = ledger
    options = {"concurrency": 2, "train_tasks": 2, **options}  # by default a scoring actor and a member per node
    return score_dataset(scorer, ray.data.from_items(ROWS, override_num_blocks=BLOCKS), stats_column=STATS,
                         batch_size=len(ROWS) // BLOCKS, **options)


def assert_every_row_once_with_the_scores_of(expected: dict, rows: list) -> None:
    assert sorted(row["id"] for row in rows) == sorted(expected)
    for row in rows:
        want, got = expected[row["id"]], row[STATS]
        assert got[fields.STATUS] == want[fields.STATUS], row["id"]
        assert got[fields.TOTAL_TOKENS] == want[fields.TOTAL_TOKENS], row["id"]
        for name in (fields.EARLY, fields.LATE, fields.GSNR):
            assert got[name] == (None if want[name] is None else pytest.approx(want[name], rel=1e-4)), (row["id"], name)


def test_two_nodes_train_score_and_cache_where_they_run_and_select_the_rows_of_one_process(
        two_nodes, one_process, tiny_gpt2_dir, tmp_path):
    from gradfilter_ops.distributed import select_dataset

    ledger = Ledger.remote(spread=2)
    scored = run_on_the_cluster(two_nodes, tiny_gpt2_dir, ledger)
    selected = select_dataset(scored.dataset, stats_column=STATS, top_ratio=0.5,
                              dropped_path=tmp_path / "dropped.jsonl")
    trained, batches = ray.get(ledger.records.remote())

    # One member trained on each node; the batches scored on both.
    assert sorted(m for _, members in trained for m in members) == [0, 1]
    assert {node for node, _ in trained} == set(two_nodes.caches)
    assert {node for node, _ in batches} == set(two_nodes.caches)
    assert sorted(i for _, ids in batches for i in ids) == sorted(one_process)  # each batch scored once
    assert_every_row_once_with_the_scores_of(one_process, scored.dataset.take_all())

    # The selection and its dropped rows are the one-process run's.
    reference = [one_process[row["id"]] for row in ROWS]
    expected = select([r[fields.GSNR] for r in reference], [r[fields.STATUS] for r in reference],
                      tokens=[r[fields.TOTAL_TOKENS] for r in reference], top_ratio=0.5)
    assert sorted(r["id"] for r in selected.dataset.take_all()) == sorted(ROWS[i]["id"] for i in expected.keep)
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").open()]
    assert {r["id"]: r["gsnr_drop_reason"] for r in dropped} == \
        {ROWS[i]["id"]: why for i, why in expected.reasons.items()}

    # Each node's cache holds what that node did: its member, and the scores of the rows it scored.
    for node, cache in two_nodes.caches.items():
        [entry] = (cache / "scores").iterdir()
        members = [m for where, share in trained if where == node for m in share]
        assert {p.name.split("_")[0] for p in (entry / "ensemble").glob("member*_epoch*")} == \
            {f"member{m}" for m in members}
        scored_here = [i for where, ids in batches if where == node for i in ids]
        ok_here = sum(one_process[i][fields.STATUS] == fields.OK for i in scored_here)
        shards = [p.read_text().splitlines()[1:] for p in (entry / "scores").glob("part-*.jsonl")]
        assert sum(len(lines) for lines in shards) == ok_here, node


def on_the_held_batch(ledger, act) -> threading.Thread:
    """A started thread that waits (at most `HOLD_S`) until the ledger holds a batch, then calls `act` with
    (actor, ids) of it once."""
    def wait_and_act():
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:
            held = ray.get(ledger.held_batch.remote())
            if held is not None:
                act(held)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=wait_and_act, daemon=True)
    thread.start()
    return thread


def test_a_scoring_actor_killed_in_a_batch_is_restarted_and_every_row_is_scored_once(
        two_nodes, one_process, tiny_gpt2_dir):
    ledger = Ledger.remote(hold="any")
    killed = {}

    def kill(held):
        actor, killed["ids"] = held
        ray.kill(actor, no_restart=False)  # a real kill of a live actor; Ray may restart it

    killer = on_the_held_batch(ledger, kill)
    scored = run_on_the_cluster(two_nodes, tiny_gpt2_dir, ledger, concurrency=1)  # the one actor is killed
    killer.join()
    _, batches = ray.get(ledger.records.remote())

    assert killed, "no batch was held, so no actor was killed"
    held_at = [ids for _, ids in batches].index(killed["ids"])
    assert killed["ids"] in [ids for _, ids in batches[held_at + 1:]]  # the killed batch was scored again
    assert_every_row_once_with_the_scores_of(one_process, scored.dataset.take_all())


def test_rows_lost_past_rays_retries_fail_the_job_naming_them(two_nodes, tiny_gpt2_dir):
    from ray.data import DataContext

    from gradfilter_ops.distributed import LostRows

    context = DataContext.get_current()
    saved = context.max_errored_blocks
    context.max_errored_blocks = 1  # Ray Data then skips a block that fails instead of failing the job
    ledger = Ledger.remote(fail_id=ROWS[7]["id"])
    try:
        with pytest.raises(LostRows) as lost:
            run_on_the_cluster(two_nodes, tiny_gpt2_dir, ledger, concurrency=1)  # where it runs is not the point
    finally:
        context.max_errored_blocks = saved
    _, batches = ray.get(ledger.records.remote())
    [failed] = {tuple(ids) for _, ids in batches if ROWS[7]["id"] in ids}
    message = str(lost.value)
    assert f"gave back {len(ROWS) - len(failed)} rows for {len(ROWS)}; {len(failed)} lost: " in message
    positions = [i for i, row in enumerate(ROWS) if row["id"] in failed]
    assert all(f"row {i} (id={ROWS[i]['id']!r})" in message for i in positions), message
    assert "nothing is selected or exported" in message
