"""The G-SNR formula on hand-made norms."""

import numpy as np
import pytest

from gradfilter_ops.engine.gsnr import gsnr_from_sq_norms


def norms(early, late):
    """[members, 2, examples] from per-member lists of early and late values (one example each)."""
    return np.array([[[e], [t]] for e, t in zip(early, late)], dtype=float)


def test_formula_by_hand():
    # members' squared norms: early 4 and 6 (mean 5), late 1 and 3 (mean 2, population var 1)
    parts = gsnr_from_sq_norms(norms([4, 6], [1, 3]), eps=0.0)
    assert parts.early[0] == 5 and parts.late[0] == 2
    assert parts.drop[0] == pytest.approx(3 / 5)
    assert parts.noise[0] == pytest.approx(1.0)
    assert parts.gsnr[0] == pytest.approx(0.6)


def test_plain_norm_and_std_options():
    parts = gsnr_from_sq_norms(norms([16, 16], [1, 9]), norm="l2", noise="std", eps=0.0)
    # plain norms: early 4, 4; late 1, 3 -> mu_s 4, mu_t 2, drop 0.5, std 1
    assert parts.drop[0] == pytest.approx(0.5)
    assert parts.noise[0] == pytest.approx(1.0)
    assert parts.gsnr[0] == pytest.approx(0.5)


def test_relvar_is_the_variance_over_the_squared_mean_and_ignores_scale():
    parts = gsnr_from_sq_norms(norms([4, 6], [1, 3]), noise="relvar", eps=0.0)
    assert parts.noise[0] == pytest.approx(1 / 4)  # var 1 over mu_t^2 = 4
    assert parts.gsnr[0] == pytest.approx(0.6 / 0.25)
    # An example whose every norm is 100x larger (a short response under a token-mean loss) scores the
    # same with relvar, and 10^4 x lower with var.
    both = np.concatenate([norms([4, 6], [1, 3]), 100 * norms([4, 6], [1, 3])], axis=2)
    relvar = gsnr_from_sq_norms(both, noise="relvar", eps=0.0).gsnr
    var = gsnr_from_sq_norms(both, noise="var", eps=0.0).gsnr
    assert relvar[0] == pytest.approx(relvar[1]) and var[0] == pytest.approx(1e4 * var[1])
    with pytest.raises(ValueError, match="Unknown noise"):
        gsnr_from_sq_norms(norms([4, 6], [1, 3]), noise="mad")


def test_eps_guards_zero_variance_and_zero_norms():
    parts = gsnr_from_sq_norms(norms([2, 2], [1, 1]), eps=1e-8)
    assert parts.noise[0] == 0
    assert parts.gsnr[0] == pytest.approx(0.5 / 1e-8)
    zero = gsnr_from_sq_norms(norms([0, 0], [0, 0]), eps=1e-8)
    assert zero.gsnr[0] == 0


def test_agreeing_learnable_example_beats_noisy_one():
    learnable = norms([4, 4], [1, 1.2])  # shrinks, members agree
    noisy = norms([4, 4], [0.2, 3.0])  # shrinks as much on average, members disagree
    grew = norms([1, 1], [2, 2])  # gradient grew: negative drop
    sq = np.concatenate([learnable, noisy, grew], axis=2)
    parts = gsnr_from_sq_norms(sq)
    assert parts.gsnr[0] > parts.gsnr[1] > parts.gsnr[2]
    assert parts.negative_drop_share == pytest.approx(1 / 3)


def test_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[members, 2, examples\]"):
        gsnr_from_sq_norms(np.zeros((2, 3, 4)))
