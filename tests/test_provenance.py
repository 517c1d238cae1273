"""The one provenance path (`provenance`) that both the Data-Juicer ops and the Ray blocks use."""


from gradfilter_ops import fields
from gradfilter_ops.provenance import claims_score, every_row_proven


def test_every_row_proven_asks_for_proofs_only_when_a_row_claims_a_score_and_warns_of_the_unproven(
        warnings_logged):
    asked = []
    assert not every_row_proven("op", [False, False], lambda: asked.append(1) or [], {})
    assert not asked and not warnings_logged
    claims = [claims_score(s) for s in ({fields.STATUS: fields.OK}, None, {fields.STATUS: fields.OK}, {})]
    assert claims == [True, False, True, False]
    assert not every_row_proven("op", claims, lambda: [True, False, False, False], {"e1": 2})
    assert len(warnings_logged) == 1 and "op: 1 row(s) arrived with G-SNR stats that this scorer did not write" \
        in warnings_logged[0]
    assert every_row_proven("op", [True, True], lambda: [True, True], {"e1": 2})
    assert not every_row_proven("op", [True, True], lambda: [True, True], {"e1": 1, "e2": 1})
    assert len(warnings_logged) == 1
