"""Phase 4: rank by G-SNR and keep the best, with a reason for every row that is not kept.

The budget is `top_k` rows, a `top_ratio` of them, or `max_tokens` tokens. With `groups`, the
row budget is split into per-group quotas (proportional to group size, or equal), with an optional
minimum per group, so that a rare source is never wiped out. `diversity: clusters` takes the groups
from the scorer's `gsnr_cluster` stat (the proxy's own view of the pool's mix); `diversity: length` from
the response-length quintiles of the scored rows (`gsnr_response_tokens`), so that a selection cannot
fill its budget with the longest answers. With `duplicate_groups`
(`near_duplicates: drop`, from `gsnr_duplicate_group`), each group of near-duplicates keeps only its
best-scored row before the budget is filled.

Only rows with a finite score (status `ok`) are ever kept: a budget larger than the scored rows
keeps fewer rows, never an unscored one, and a selection over rows none of which has a score
raises `NoScoredRows` with the likely cause.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

from loguru import logger

from . import fields
from .config import check_option, require_positive_int

QUOTAS = ("proportional", "equal")
DIVERSITY = ("clusters", "length")  # `diversity`: where the groups of the quotas come from, besides `group_by`
LENGTH_BINS = 5  # `diversity: length`: response-length quantile bins of the scored rows
NEAR_DUPLICATES = ("keep", "drop")


class NoScoredRows(ValueError):
    """Not one row of a selection has a G-SNR score."""


def validate_budget(top_k: Optional[int] = None, top_ratio: Optional[float] = None,
                    max_tokens: Optional[int] = None) -> None:
    """Exactly one of `top_k` (a positive integer), `top_ratio` (in (0, 1]) and `max_tokens` (positive)."""
    given = [name for name, value in (("top_k", top_k), ("top_ratio", top_ratio), ("max_tokens", max_tokens))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"Set exactly one of `top_k`, `top_ratio` and `max_tokens`, got {given or 'none'}.")
    for name, value in (("top_k", top_k), ("max_tokens", max_tokens)):
        require_positive_int(name, value, nullable=True)
    if top_ratio is not None and not (isinstance(top_ratio, (int, float)) and 0 < top_ratio <= 1):
        raise ValueError(f"`top_ratio` must be in (0, 1], got {top_ratio!r}.")


def validate_options(*, top_k: Optional[int] = None, top_ratio: Optional[float] = None,
                     max_tokens: Optional[int] = None, grouped: bool = False, group_quota: str = "proportional",
                     min_per_group: int = 0, diversity: Optional[str] = None, near_duplicates: str = "keep") -> None:
    """The options of `select` (`grouped`: whether it gets `groups` from `group_by`; `diversity` and
    `near_duplicates`, the ops' options), checked before any row is read, so that an op refuses a bad
    recipe when it is built."""
    validate_budget(top_k, top_ratio, max_tokens)
    if group_quota not in QUOTAS:
        raise ValueError(f"`group_quota` must be one of {list(QUOTAS)}, got {group_quota!r}.")
    if diversity is not None and diversity not in DIVERSITY:
        raise ValueError(f"`diversity` must be one of {list(DIVERSITY)} or null, got {diversity!r}.")
    if near_duplicates not in NEAR_DUPLICATES:
        raise ValueError(f"`near_duplicates` must be one of {list(NEAR_DUPLICATES)}, got {near_duplicates!r}.")
    if grouped and diversity is not None:
        raise ValueError(f"`diversity: {diversity}` makes the groups of the quotas; it cannot be combined with "
                         "`group_by`.")
    if (grouped or diversity is not None) and max_tokens is not None:
        raise ValueError("`max_tokens` cannot be combined with `group_by` or `diversity`; use `top_k` or `top_ratio` "
                         "there.")
    if isinstance(min_per_group, bool) or not isinstance(min_per_group, int) or min_per_group < 0:
        raise ValueError(f"`min_per_group` must be a non-negative integer, got {min_per_group!r}.")


def rows_for_ratio(n: int, ratio: float) -> int:
    """floor(ratio * n) rows, at least 1: what a top `ratio` of n rows keeps."""
    return max(1, math.floor(ratio * n + 1e-9))  # 1e-9: 0.29 * 100 must give 29, not 28


def num_to_keep(n: int, top_k: Optional[int] = None, top_ratio: Optional[float] = None) -> int:
    """How many of `n` rows to keep: `top_k` capped at n, or floor(top_ratio * n), at least 1 when n > 0."""
    validate_budget(top_k, top_ratio)
    if n == 0:
        return 0
    if top_k is not None:
        if top_k > n:
            logger.warning(f"top_k={top_k} is larger than the {n} rows; keeping all of them.")
        return min(top_k, n)
    return rows_for_ratio(n, top_ratio)


def _is_finite(score: object) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def rank(scores: Sequence[Optional[float]]) -> list[int]:
    """Indices from best to worst: higher score first, ties by input order; missing or non-finite last."""
    return sorted(range(len(scores)), key=lambda i: (0, -scores[i], i) if _is_finite(scores[i]) else (1, 0.0, i))


def scored_order(scores: Sequence[Optional[float]], statuses: Optional[Sequence[str]] = None) -> list[int]:
    """The rows that may be kept (a finite score, and status `ok` when statuses are given), best first;
    `NoScoredRows` when there are rows but none of them qualifies."""
    order = [i for i in rank(scores) if _is_finite(scores[i]) and (statuses is None or statuses[i] == fields.OK)]
    if scores and not order:
        counts = Counter(statuses) if statuses is not None else Counter({"no score": len(scores)})
        cause = fields.NO_SCORE_CAUSES.get(counts.most_common(1)[0][0], "no row has a finite `gsnr`")
        raise NoScoredRows(f"None of the {len(scores)} rows has a G-SNR score (statuses {dict(counts)}), so nothing "
                           f"can be selected. Likely cause: {cause}.")
    return order


def select_top_k(scores: Sequence[Optional[float]], top_k: Optional[int] = None,
                 top_ratio: Optional[float] = None) -> list[int]:
    """Indices of the rows to keep, in their original order; rows without a finite score are never kept."""
    return sorted(scored_order(scores)[: num_to_keep(len(scores), top_k, top_ratio)])


# The stat each of the ops' group options reads, and the scorer option that writes it.
GROUP_STATS = {"diversity": (fields.CLUSTER, "`clusters: true`"),
               "near_duplicates": (fields.DUPLICATE_GROUP, "`near_duplicate_threshold` (e.g. 0.95)")}


def stat_groups(option: str, values: Sequence[Optional[Hashable]], statuses: Sequence[str]) -> list:
    """The values of the group stat that `option` (`diversity` or `near_duplicates`) reads, for `select`; a
    ValueError naming the scorer option when a scored row lacks it (rows without a score are never kept)."""
    name, scorer_option = GROUP_STATS[option]
    missing = sum(value is None for value, status in zip(values, statuses) if status == fields.OK)
    if missing:
        raise ValueError(f"`{option}` reads the `{name}` stat, and {missing} of the {len(values)} rows have a score "
                         f"but no `{name}`: score them with {scorer_option} (an option of `gsnr_scorer`, "
                         "`ray_gsnr_scorer` and `GSNRConfig`).")
    return list(values)


def length_bins(lengths: Sequence[float], bins: int = LENGTH_BINS) -> list[int]:
    """Each row's response-length quantile bin (0 = shortest), `bins` bins of about equal size; rows of
    equal length share a bin (the bin of the first of them in length order)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    first: dict[float, int] = {}
    for position, i in enumerate(order):
        first.setdefault(lengths[i], position)
    return [min(bins - 1, first[value] * bins // len(lengths)) for value in lengths]


def length_groups(response_tokens: Sequence[Optional[int]], statuses: Sequence[str]) -> list[str]:
    """The groups of `diversity: length`: each scored row's response-length quintile among the scored rows,
    named by its bin and token range (e.g. `2/5: 14-31 tokens`); rows without a score are `no score`."""
    scored = [i for i, status in enumerate(statuses) if status == fields.OK]
    missing = [i for i in scored if not isinstance(response_tokens[i], int)]
    if missing:
        raise ValueError(f"`diversity: length` reads `{fields.RESPONSE_TOKENS}`, and {len(missing)} of the "
                         f"{len(statuses)} rows have a score but no `{fields.RESPONSE_TOKENS}`: score them again "
                         "with `gsnr_scorer`.")
    bins = length_bins([response_tokens[i] for i in scored])
    ranges: dict[int, list[int]] = defaultdict(list)
    for i, b in zip(scored, bins):
        ranges[b].append(response_tokens[i])
    names = {b: f"{b + 1}/{LENGTH_BINS}: {min(v)}-{max(v)} tokens" for b, v in ranges.items()}
    groups = ["no score"] * len(statuses)
    for i, b in zip(scored, bins):
        groups[i] = names[b]
    return groups


def stat_selection_inputs(diversity: Optional[str], near_duplicates: str, statuses: Sequence[str],
                          clusters: Sequence[Optional[int]], duplicate_groups: Sequence[Optional[int]],
                          response_tokens: Optional[Sequence[Optional[int]]] = None):
    """`(groups, duplicate_groups)` for `select` from the stats that `diversity` (`clusters`: `gsnr_cluster`;
    `length`: `gsnr_response_tokens`) and `near_duplicates: drop` read (each None where not asked for); see
    `stat_groups` for rows that lack them."""
    groups = None
    if diversity == "clusters":
        groups = [str(g) for g in stat_groups("diversity", clusters, statuses)]
    elif diversity == "length":
        if response_tokens is None:
            raise ValueError(f"`diversity: length` needs each row's `{fields.RESPONSE_TOKENS}`.")
        groups = length_groups(response_tokens, statuses)
    duplicates = stat_groups("near_duplicates", duplicate_groups, statuses) if near_duplicates == "drop" else None
    return groups, duplicates


def near_duplicate_drops(order: Sequence[int], duplicate_groups: Sequence[Hashable]) -> dict[int, str]:
    """Row index -> `near_duplicate` for the rows of `order` (best first) whose near-duplicate group has a
    row ranked before them: each group keeps its best-scored row (ties by input order)."""
    seen, drops = set(), {}
    for i in order:
        if duplicate_groups[i] in seen:
            drops[i] = fields.NEAR_DUPLICATE
        else:
            seen.add(duplicate_groups[i])
    return drops


@dataclass
class Selection:
    keep: list[int]  # kept row indices, in their original order
    reasons: dict[int, str] = field(default_factory=dict)  # dropped row index -> reason code


def quotas(ranks: dict[Hashable, Sequence[int]], budget: int, mode: str = "proportional",
           minimum: int = 0) -> dict[Hashable, int]:
    """Split a row budget over groups; each quota is at most its group's size.

    `ranks[g]` holds the positions of group g's rows in the overall ranking (0 is the best row), best
    first; a group's size is their number. Each group gets the whole part of its share (proportional
    to size, or equal), and the seats left over go, one per group, to the groups whose next row ranks
    best. Groups below min(minimum, size) are then raised to it, taking rows back from the largest
    quotas (of equal ones, the quota whose last row ranks worst); when the minimums alone exceed the
    budget, the minimums win.
    """
    if mode not in QUOTAS:
        raise ValueError(f"`group_quota` must be one of {list(QUOTAS)}, got {mode!r}.")
    quota = _apportion({g: (len(r) if mode == "proportional" else 1) for g, r in ranks.items()}, ranks, budget)
    floor = {g: min(minimum, len(r)) for g, r in ranks.items()}
    quota = {g: max(q, floor[g]) for g, q in quota.items()}
    excess = sum(quota.values()) - budget
    while excess > 0:
        above = [g for g in quota if quota[g] > floor[g]]
        if not above:
            break
        largest = min(above, key=lambda g: (-quota[g], -ranks[g][quota[g] - 1]))
        quota[largest] -= 1
        excess -= 1
    return quota


def _apportion(weights: dict[Hashable, float], ranks: dict[Hashable, Sequence[int]],
               budget: int) -> dict[Hashable, int]:
    """`budget` apportioned by `weights`, never above a group's size: the whole part of each share, then
    one leftover seat each to the groups whose next row ranks best (`ranks` as in `quotas`)."""
    caps = {g: len(r) for g, r in ranks.items()}
    quota = {g: 0 for g in weights}
    left = min(budget, sum(caps.values()))
    while left > 0:
        open_groups = [g for g in weights if quota[g] < caps[g]]
        total = sum(weights[g] for g in open_groups)
        grants = {g: min(math.floor(left * weights[g] / total), caps[g] - quota[g]) for g in open_groups}
        spare = left - sum(grants.values())
        growing = [g for g in open_groups if quota[g] + grants[g] < caps[g]]
        for g in sorted(growing, key=lambda g: ranks[g][quota[g] + grants[g]])[:spare]:
            grants[g] += 1
        for g, extra in grants.items():
            quota[g] += extra
        left = min(budget, sum(caps.values())) - sum(quota.values())
    return quota


def select(scores: Sequence[Optional[float]], statuses: Sequence[str], *, top_k: Optional[int] = None,
           top_ratio: Optional[float] = None, max_tokens: Optional[int] = None,
           tokens: Optional[Sequence[int]] = None, groups: Optional[Sequence[Hashable]] = None,
           group_quota: str = "proportional", min_per_group: int = 0,
           duplicate_groups: Optional[Sequence[Hashable]] = None) -> Selection:
    """Choose rows by G-SNR under one budget; every dropped row gets a reason code.

    A dropped row without a score keeps its own status as its reason (`empty_response`, ...). With
    `duplicate_groups` (each row's near-duplicate group), a scored row whose group has a better-scored
    row is `near_duplicate`, and the budget is filled from the rest. A dropped scored row is otherwise
    `below_top_k_cutoff`, `over_token_budget`, or `group_quota_full` when it would have made the cut
    without the group quotas. Rows without a score are never kept; the row budget is counted over all
    n rows, so it keeps fewer rows when fewer are scored.
    """
    validate_options(top_k=top_k, top_ratio=top_ratio, max_tokens=max_tokens, grouped=groups is not None,
                     group_quota=group_quota, min_per_group=min_per_group)
    n = len(scores)
    order = scored_order(scores, statuses)
    duplicates = {}
    if duplicate_groups is not None:
        duplicates = near_duplicate_drops(order, stat_groups("near_duplicates", duplicate_groups, statuses))
        order = [i for i in order if i not in duplicates]
    if max_tokens is not None:
        if tokens is None:
            raise ValueError("`max_tokens` needs the token count of every row.")
        keep, used = [], 0
        for i in order:
            if used + tokens[i] > max_tokens:
                break
            keep.append(i)
            used += tokens[i]
        if order and not keep:
            logger.warning(f"gsnr: the token budget max_tokens={max_tokens} keeps no row: the best row has "
                           f"{tokens[order[0]]} tokens and the smallest scored row {min(tokens[i] for i in order)}; "
                           "raise `max_tokens` or lower `max_length`.")
        cut_reason = fields.OVER_TOKEN_BUDGET
    else:
        budget = num_to_keep(n, top_k, top_ratio)
        if len(order) < budget:
            logger.warning(f"gsnr: only {len(order)} of {n} rows have a score, fewer than the budget of {budget} "
                           "rows; the rows without a score are dropped with their status, never kept.")
        keep = order[:budget]
        cut_reason = fields.BELOW_CUTOFF
        if groups is not None:
            unstratified = set(keep)
            group_ranks = defaultdict(list)  # group -> the rank positions of its scored rows, best first
            for position, i in enumerate(order):
                group_ranks[groups[i]].append(position)
            quota = quotas(group_ranks, budget, group_quota, min_per_group)
            keep = [order[p] for g, positions in group_ranks.items() for p in positions[: quota[g]]]
    kept = set(keep)
    reasons = {}
    for i in range(n):
        if i in kept:
            continue
        if statuses[i] != fields.OK:
            reasons[i] = statuses[i]
        elif i in duplicates:
            reasons[i] = duplicates[i]
        elif groups is not None and max_tokens is None and i in unstratified:
            reasons[i] = fields.GROUP_QUOTA_FULL
        else:
            reasons[i] = cut_reason
    return Selection(keep=sorted(kept), reasons=reasons)


def validate_range(min_gsnr: Optional[float], max_gsnr: Optional[float]) -> None:
    """`min_gsnr` and `max_gsnr`: finite numbers or null, and not min > max (which would drop every row)."""
    for name, value in (("min_gsnr", min_gsnr), ("max_gsnr", max_gsnr)):
        check_option(name, value, Optional[float])
    if min_gsnr is not None and max_gsnr is not None and min_gsnr > max_gsnr:
        raise ValueError(f"`min_gsnr` ({min_gsnr}) is greater than `max_gsnr` ({max_gsnr}), so no row could be kept; "
                         "swap them or leave one out.")


def in_range(gsnr: Optional[float], min_gsnr: Optional[float], max_gsnr: Optional[float]) -> bool:
    """Whether a row has a score within [min_gsnr, max_gsnr] (an open end when None)."""
    return gsnr is not None and (min_gsnr is None or gsnr >= min_gsnr) and (max_gsnr is None or gsnr <= max_gsnr)


def range_drops(scores: Sequence[Optional[float]], statuses: Sequence[str], min_gsnr: Optional[float],
                max_gsnr: Optional[float]) -> dict[int, str]:
    """Row index -> reason, for the rows outside [min_gsnr, max_gsnr]; a row without a score keeps its status."""
    return {i: fields.OUTSIDE_RANGE if status == fields.OK else status
            for i, (gsnr, status) in enumerate(zip(scores, statuses)) if not in_range(gsnr, min_gsnr, max_gsnr)}
