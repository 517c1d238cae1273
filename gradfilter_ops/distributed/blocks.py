"""Score fields block by block: reading them from a block (as columns or inside a stats struct),
and a block with its rows' scores added (`add_scores`), keeping the scores a row can prove."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .. import fields
from ..provenance import fitted_ensemble, proven_rows, score_unproven, scorer_fingerprint
from ..scorer import GSNRScorer


def arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    types = {name: pa.float64() for name in fields.PARTS}
    types.update({fields.STATUS: pa.string(), fields.TRUNCATED: pa.bool_(), fields.RESPONSE_TOKENS: pa.int64(),
                  fields.TOTAL_TOKENS: pa.int64(), fields.ENSEMBLE: pa.string(), fields.PROOF: pa.string()})
    types.update({name: pa.int64() for name in fields.GROUP_FIELDS})
    return types



def block_fields(block, stats_column: Optional[str], names: Sequence[str], group_by: Optional[str] = None):
    """The score fields `names` of one block (None where absent), and its `group_by` values."""
    import pyarrow as pa

    out: dict[str, list] = {}
    if stats_column is None:
        source = {name: block.column(name) for name in names if name in block.column_names}
    elif stats_column in block.column_names:
        stats = block.column(stats_column).combine_chunks()
        # flatten(), unlike field(), gives null where a row's whole stats are null (rows not scored yet)
        if not (pa.types.is_struct(stats.type) or pa.types.is_null(stats.type)):
            raise_not_a_mapping(block, stats_column)
        children = dict(zip((stats.type.field(k).name for k in range(stats.type.num_fields)), stats.flatten())) \
            if pa.types.is_struct(stats.type) else {}
        source = {name: children[name] for name in names if name in children}
    else:
        source = {}
    for name in names:
        out[name] = source[name].to_pylist() if name in source else [None] * block.num_rows
    if group_by is not None:
        if group_by not in block.column_names:
            raise ValueError(f"`group_by: {group_by}` is not a field of the dataset; fields: {block.column_names}.")
        out["group"] = [str(g) for g in block.column(group_by).to_pylist()]
    return out


def raise_not_a_mapping(block, stats_column: str) -> None:
    """A ValueError naming the first row of `block` whose `stats_column` holds a value that is not a mapping."""
    values = block.column(stats_column).to_pylist()
    i = next(i for i, value in enumerate(values) if value is not None)
    row_id = block.column("id")[i].as_py() if "id" in block.column_names else None
    named = f"a row (id {row_id!r})" if row_id is not None else f"row {i} of a block"
    raise ValueError(f"{named} has `{stats_column}` = {str(values[i])[:80]!r} ({type(values[i]).__name__}), not a "
                     "mapping of stats; remove the field from that row or give it the stats as an object.")


def fields_by_block(refs, stats_column: Optional[str], names: Sequence[str], group_by: Optional[str] = None):
    import ray

    read = ray.remote(num_cpus=0)(block_fields)  # a cheap read: no CPU held back from the scoring actors
    return ray.get([read.remote(ref, stats_column, names, group_by) for ref in refs])


def joined(parts: Sequence[dict], name: str) -> list:
    return [value for part in parts for value in part[name]]


def read_fields(dataset, names: Sequence[str], stats_column: Optional[str] = None) -> dict[str, list]:
    """The score fields `names` of every row of a materialized `dataset`, in block order (None where absent)."""
    parts = fields_by_block(dataset.to_arrow_refs(), stats_column, names)
    return {name: joined(parts, name) for name in names}



def score_inputs(block, stats_column: Optional[str]):
    """`block` without its stats: the fields a row is scored on."""
    return block.drop_columns([c for c in block.column_names
                               if c == stats_column or c in fields.STATS_FIELDS or c in fields.GROUP_FIELDS])


def block_proven(block, stats_column: str, fingerprint: str, config, ensemble: Optional[str] = None) -> list[bool]:
    """`provenance.proven_rows` for the rows of `block`, whose stats are in `stats_column`."""
    existing = block_fields(block, stats_column, fields.STATS_FIELDS)
    stats = [{name: existing[name][i] for name in fields.STATS_FIELDS} for i in range(block.num_rows)]
    return proven_rows(fingerprint, config, score_inputs(block, stats_column).to_pydict(), stats, ensemble)


def add_scores(block, scorer: GSNRScorer, stats_column: Optional[str] = None):
    """`block` (a `pyarrow.Table`) with the score fields of its rows; rows whose `stats_column`
    already holds a score this scorer wrote for them (`provenance`) keep it and are not scored again.
    The group fields the options ask for (`config.group_fields`) are written for every row, and group
    fields they do not ask for are removed (they would be read as this run's)."""
    import pyarrow as pa

    types = arrow_types()
    n = block.num_rows
    group_names = scorer.config.group_fields
    names = (fields.STATS_FIELDS if stats_column else fields.SCORE_FIELDS) + group_names
    existing = block_fields(block, stats_column, names) if stats_column else None
    proven = (block_proven(block, stats_column, scorer_fingerprint(scorer), scorer.config, fitted_ensemble(scorer))
              if stats_column else [False] * n)
    values = existing or {name: [None] * n for name in names}
    updates = score_unproven(scorer, score_inputs(block, stats_column).to_pydict(), proven,
                             with_proof=bool(stats_column))
    for i, update in enumerate(updates):
        for name in names:
            if name in update:
                values[name][i] = update[name]
    arrays = {name: pa.array(values[name], type=types[name]) for name in names}
    stale = [name for name in fields.GROUP_FIELDS if name not in group_names]
    if stats_column is None:
        block = block.drop_columns([name for name in stale if name in block.column_names])
        for name, array in arrays.items():
            block = (block.set_column(block.column_names.index(name), name, array) if name in block.column_names
                     else block.append_column(name, array))
        return block
    names, children = [], []
    if stats_column in block.column_names:
        stats = block.column(stats_column).combine_chunks()
        if pa.types.is_struct(stats.type):
            for k, child in enumerate(stats.flatten()):
                if stats.type.field(k).name not in arrays and stats.type.field(k).name not in stale:
                    names.append(stats.type.field(k).name)
                    children.append(child)
    struct = pa.StructArray.from_arrays(children + list(arrays.values()), names=names + list(arrays))
    if stats_column in block.column_names:
        return block.set_column(block.column_names.index(stats_column), stats_column, struct)
    return block.append_column(stats_column, struct)

