"""Names of the per-example score fields and the reason codes written next to them.

The `datasets` API writes these as columns; the Data-Juicer ops write them into `__dj__stats__`.
"""

GSNR = "gsnr"  # the score: drop / (noise + eps); None when `gsnr_status` is not "ok"
EARLY = "gsnr_early"  # mean over members of the gradient norm at the early snapshot (mu_s)
LATE = "gsnr_late"  # mean over members at the late snapshot (mu_t)
DROP = "gsnr_drop"  # normalized gradient drop (mu_s - mu_t) / (mu_s + eps): the signal
NOISE = "gsnr_noise"  # var, std or relvar (var / mean^2) over members of the late norms: the noise
STATUS = "gsnr_status"  # "ok" or a reason code below
TRUNCATED = "gsnr_truncated"  # True when tokens were cut to fit `max_length`
RESPONSE_TOKENS = "gsnr_response_tokens"  # response tokens that carried loss
TOTAL_TOKENS = "gsnr_tokens"  # prompt + response tokens the proxy saw (what a token budget counts)

SCORE_FIELDS = (GSNR, EARLY, LATE, DROP, NOISE, STATUS, TRUNCATED, RESPONSE_TOKENS, TOTAL_TOKENS)
# Written by the Data-Juicer ops next to the score fields: the ensemble that scored the row (a digest of
# the scorer's fingerprint and the rows it trained on; scores of two ensembles are not comparable), and a
# digest over the scorer's fingerprint, the row's scored fields, its ensemble and its score fields
# (`provenance`). Stats without a matching proof are scored again instead of being trusted.
ENSEMBLE = "gsnr_ensemble"
PROOF = "gsnr_proof"
STATS_FIELDS = SCORE_FIELDS + (ENSEMBLE, PROOF)
PARTS = (EARLY, LATE, DROP, NOISE, GSNR)  # the numbers that come out of the proxy
# Written next to the score fields when the scorer is asked for them (`clusters`, `near_duplicate_threshold`):
# groups of the rows by the proxy's pooled hidden states, computed over every row `fit` saw. The ids are
# labels (equal id, same group), numbered in the order of the rows' content hashes; None where status is not ok.
CLUSTER = "gsnr_cluster"  # k-means cluster, for `diversity: clusters`
DUPLICATE_GROUP = "gsnr_duplicate_group"  # near-duplicate group, for `near_duplicates: drop`
GROUP_FIELDS = (CLUSTER, DUPLICATE_GROUP)

# Reason codes. Every row gets exactly one; only "ok" rows have a finite `gsnr`.
OK = "ok"
MISSING_FIELD = "missing_field"  # a required field is absent or null (chat: no final assistant turn)
INVALID_FIELD = "invalid_field"  # a field holds no text: a list, a mapping, a boolean, NaN (a number is its text)
EMPTY_RESPONSE = "empty_response"  # the response is empty or whitespace only
NON_FINITE = "non_finite_score"  # the gradient norms or the G-SNR came out NaN or infinite
SCORING_ERROR = "scoring_error"  # the proxy failed on this row alone (the error is logged)

STATUSES = (OK, MISSING_FIELD, INVALID_FIELD, EMPTY_RESPONSE, NON_FINITE, SCORING_ERROR)

# The likely cause when no row at all could be scored, by the reason most rows got.
NO_SCORE_CAUSES = {
    MISSING_FIELD: "the rows lack the fields the scorer reads: check `format`, `instruction_field`, `input_field`, "
                   "`output_field`, `messages_field` or `response_field` against the data's field names (a typo "
                   "gives every row missing_field), and that chat rows have an assistant turn",
    INVALID_FIELD: "the fields the scorer reads hold no text (lists, booleans...): "
                   "check the field options and `format`",
    EMPTY_RESPONSE: "every response is empty: check `output_field` / `response_field`",
    NON_FINITE: "the proxy's gradients came out NaN or infinite: try `precision: fp32` or a lower `learning_rate`",
    SCORING_ERROR: "the proxy failed on every row: see the errors logged above",
}

# Why `gsnr_top_k_filter` dropped a scored row (rows without a score are dropped for their status).
BELOW_CUTOFF = "below_top_k_cutoff"
GROUP_QUOTA_FULL = "group_quota_full"
OVER_TOKEN_BUDGET = "over_token_budget"
NEAR_DUPLICATE = "near_duplicate"  # `near_duplicates: drop`: a row of its group with a better G-SNR is kept
OUTSIDE_RANGE = "outside_gsnr_range"  # `gsnr_scorer` with min_gsnr / max_gsnr
