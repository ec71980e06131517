"""Orthogonal keys: orthogonal, Haar (law invariant under a fixed orthogonal map), both determinants."""

import math

import numpy as np
import pytest

from cvconvert.device.keys import haar_orthogonal, secure_angles, secure_normal

N = 4000
LEVEL = 1e-4  # per KS comparison (34 a case: see test_haar_law_is_invariant)


def ks_pvalue(x, y):
    """Two-sample Kolmogorov-Smirnov p-value (asymptotic; scipy is not a dependency of this project)."""
    x, y = np.sort(x), np.sort(y)
    grid = np.concatenate((x, y))
    d = np.abs(np.searchsorted(x, grid, side="right") / len(x) - np.searchsorted(y, grid, side="right") / len(y)).max()
    ne = len(x) * len(y) / (len(x) + len(y))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    k = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k ** 2 * lam ** 2)), 0, 1))


def stats(q):
    """The scalars compared: every entry and the trace."""
    p = q.shape[-1]
    cols = [q[:, i, j] for i in range(p) for j in range(p)]
    return cols + [np.trace(q, axis1=1, axis2=2)]


def law_rejected(sample, p, q0):
    """Does a KS test tell sample(N) from q0 @ sample(N) or sample(N) @ q0 on any entry or the trace?"""
    base = stats(sample(N, p))
    left, right = stats(q0 @ sample(N, p)), stats(sample(N, p) @ q0)
    pv = [ks_pvalue(a, b) for a, b in zip(base, left)] + [ks_pvalue(a, b) for a, b in zip(base, right)]
    return min(pv) < LEVEL


def fixed_orthogonal(p, det):
    q0 = np.linalg.qr(np.random.default_rng(p).normal(size=(p, p)))[0]
    if np.sign(np.linalg.det(q0)) != det:
        q0[:, 0] *= -1
    return q0.astype(np.float32)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_keys_are_orthogonal(p):
    q = haar_orthogonal(500, p)
    assert q.shape == (500, p, p) and q.dtype == np.float32
    np.testing.assert_allclose(q @ q.transpose(0, 2, 1), np.broadcast_to(np.eye(p), q.shape), atol=1e-6)
    assert len({q[i].tobytes() for i in range(len(q))}) == len(q)  # fresh draws


@pytest.mark.parametrize("p", [3, 4])
@pytest.mark.parametrize("det", [1, -1])
def test_haar_law_is_invariant(p, det):
    # 34 KS comparisons a case: a correct sampler's smallest p-value falls under LEVEL about once in 300-1000
    # cases (seen once in CI-sized runs), so a rejection must hold on a second, independent draw too; a wrong
    # law (the control below) is rejected on every draw.
    np.random.seed(None)
    q0 = fixed_orthogonal(p, det)
    assert not (law_rejected(haar_orthogonal, p, q0) and law_rejected(haar_orthogonal, p, q0))


def test_invariance_check_catches_qr_without_sign_fix():
    # The same check rejects the plain QR law (LAPACK's convention makes Q[0, 0] <= 0): it can fail.
    def plain_qr(n, p):
        return np.linalg.qr(secure_normal(n * p * p).reshape(n, p, p))[0].astype(np.float32)

    assert law_rejected(plain_qr, 3, fixed_orthogonal(3, 1))


@pytest.mark.parametrize("p", [2, 3, 4])
def test_haar_moments_and_determinants(p):
    q = haar_orthogonal(N, p).astype(np.float64)
    # Haar on O(p): E q_ij = 0, E q_ij^2 = 1/p, E tr Q = 0, E (tr Q)^2 = 1; det = +1 or -1 with probability 1/2.
    # Bounds at 5 standard errors (sd of q_ij^2 is below 1/sqrt(p), of (tr Q)^2 about sqrt(2)).
    se = 1 / math.sqrt(N)
    assert np.abs(q.mean(0)).max() < 5 * se * math.sqrt(1 / p)
    assert np.abs((q ** 2).mean(0) - 1 / p).max() < 5 * se / math.sqrt(p)
    tr = np.trace(q, axis1=1, axis2=2)
    assert abs(tr.mean()) < 5 * se and abs((tr ** 2).mean() - 1) < 5 * se * math.sqrt(2)
    det = np.linalg.det(q)
    np.testing.assert_allclose(np.abs(det), 1, atol=1e-5)
    assert abs((det > 0).mean() - 0.5) < 4 * math.sqrt(0.25 / N)


def test_secure_normal_and_angles():
    z = secure_normal(20001)
    assert z.shape == (20001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.04 and abs(z.std() - 1) < 0.03
    assert ks_pvalue(z[:10000], np.random.default_rng(0).normal(size=10000)) > LEVEL
    t = secure_angles(1000)
    assert t.dtype == np.float32 and t.min() >= 0 and t.max() < 2 * math.pi
