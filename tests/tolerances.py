"""Float32 tolerances derived from rounding-error bounds, for tests that compare one computation run at two batch shapes.

A float32 GEMM (or conv, or attention) picks its blocking, and so the order in which it sums each output, from the
shapes it is given: the same row computed in a batch of 1 and in a batch of 11 may differ in its last bits. Tests
that compare such runs use the bounds here instead of a bare number, and say in a comment which reductions differ.

Reference: N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (SIAM 2002), section 3.1.
"""

from __future__ import annotations

import math

import numpy as np

#: Unit roundoff of float32: |fl(x) - x| <= U32 |x| for round-to-nearest (half of eps32 = 2**-23, the spacing at 1).
U32 = 2.0**-24


def gamma(k: int, u: float = U32) -> float:
    """gamma_k = k u / (1 - k u), the relative bound of k roundings (Higham Lemma 3.1).

    A length-k dot product or sum computed in any order satisfies |fl(sum a_i b_i) - sum a_i b_i| <= gamma_k
    sum |a_i b_i| (Higham eq. (3.5); k - 1 additions and k products, FMA or not, are within k roundings).
    """
    if k < 0 or k * u >= 1:
        raise ValueError(f"gamma: k {k} must be in 0..{int(1 / u) - 1}")
    return k * u / (1 - k * u)


def reorder_tol(k: int, abs_sum: float = 1.0) -> float:
    """Bound on |x - y| for two float32 evaluations x, y of the same length-k reduction in different orders.

    Each lies within gamma_k * sum|a_i b_i| of the exact value (whatever the order), so they differ by at most
    twice that. Args: k: reduction length; abs_sum: sum |a_i b_i| (1 for a dot product of unit vectors, by
    Cauchy-Schwarz).
    """
    return 2 * gamma(k) * abs_sum


def unit_embedding_err(k: int, dim: int) -> float:
    """Bound on ||fl(f / |f|) - f_exact / |f_exact| ||_2 for one float32 run of a unit-normalised embedding.

    Model (stated, not a theorem for a whole network): the embedding f's error relative to |f| is that of the
    network's longest reduction, gamma_k. Normalising doubles a relative error (||f/|f| - g/|g||| <= 2 |f - g| / |f|)
    and adds the norm's own rounding (a length-dim sum of squares, a square root, a division: gamma_{dim + 2}).
    The model assumes errors of earlier layers are not amplified (LayerNorm'd residual blocks); a worst-case
    bound over every reduction of a transformer times each layer's condition number is orders of magnitude looser
    and, after a x100 logit scale, too loose to tell a real bug from rounding.

    Args:
        k: length of the longest reduction between the input and the embedding (e.g. a ViT's patch
            convolution, 3 * patch**2, or an MLP's intermediate width).
        dim: embedding width.
    """
    return 2 * gamma(k) + gamma(dim + 2)


def sigmoid_tol(p, logit_tol: float):
    """Bound on |sigmoid(z + d) - sigmoid(z)| over |d| <= logit_tol, where p = sigmoid(z) (array or float).

    sigmoid'(z) = p (1 - p), and sigmoid'(z + t) <= sigmoid'(z) e^|t| (cosh(a) <= cosh(a + b) e^|b|), so the
    change is at most p (1 - p) (e^logit_tol - 1): tight around p = 1/2, and relative to p (or 1 - p) in the
    tails. A two-way softmax is a sigmoid of the logit difference: softmax([a, b])[0] = sigmoid(a - b).
    """
    p = np.asarray(p, dtype=np.float64)
    return p * (1 - p) * math.expm1(logit_tol)


def assert_within(actual, expected, tol, what: str) -> None:
    """Assert |actual - expected| <= tol elementwise (tol an array of the same shape, or a float); the failure names
    the worst element (largest excess over its bound), both values and the bound."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    assert np.isfinite(a).all() and np.isfinite(e).all(), f"{what}: non-finite values"
    bound = np.broadcast_to(np.asarray(tol, dtype=np.float64), a.shape)
    excess = np.abs(a - e) - bound
    i = np.unravel_index(int(np.argmax(excess)), a.shape)
    assert excess[i] <= 0, (
        f"{what}: worst element {tuple(int(j) for j in i)}: got {a[i]:.9g}, expected {e[i]:.9g}, "
        f"|diff| {abs(a[i] - e[i]):.3g} > bound {bound[i]:.3g}; max |diff| {np.abs(a - e).max():.3g}"
    )
