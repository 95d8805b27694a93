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


def sigmoid_prob_tol(p, logit_tol: float):
    """Bound on |p1 - p2| for p = sigmoid(z) computed in float32 in two runs whose logits differ by <= logit_tol.

    sigmoid_tol for the logits' difference, plus each run's own rounding of 1 / (1 + exp(-z)): exp within two
    roundings (PyTorch's vectorised exp is within 1 ulp), the addition and the division: gamma_4 p per run.
    """
    p = np.asarray(p, dtype=np.float64)
    return sigmoid_tol(p, logit_tol) + 2 * gamma(4) * p


def softmax_max_tol(p, logit_tol: float, n: int):
    """Bound on |p1 - p2| for p = max_j softmax(z)_j over n logits, computed in float32 in two runs whose logits
    differ by <= logit_tol each (p: either run's value, array or float).

    softmax(z)_j = 1 / sum_i exp(z_i - z_j): moving every logit by at most t moves each z_i - z_j by at most 2t, so
    each component is scaled by a factor in [e^-2t, e^2t], and so is their maximum (whichever j attains it):
    |p1 - p2| <= p expm1(2t). Each run's own rounding of the softmax (exp within two roundings, a sum of n terms,
    a division) adds gamma_{n+3} p per run.
    """
    p = np.asarray(p, dtype=np.float64)
    return p * math.expm1(2 * logit_tol) + 2 * gamma(n + 3) * p


# ----------------------------------------------------------------------------------------------------------------
# R-Tagger (models/rlipv2): the same pair slots decoded at other batch shapes.
#
# Error model (stated, as unit_embedding_err's; not a theorem for a whole network): the network is a chain of
# blocks, each a few reductions followed by a normalisation (a LayerNorm'd residual sub-layer, a conv + BatchNorm,
# a GroupNorm). A block adds at most gamma_k of its output's scale, k its longest reduction, and passes the error it
# receives on without amplifying it (the normalisations keep the scale). The errors of successive blocks add:
# sum_b gamma_{k_b} <= gamma_{sum_b k_b}, so the features entering the heads are within gamma_K, K = the sum over
# the chain of each block's longest reduction (rtagger_chain_length), of their scale. In the tests' tiny models the
# measured run-to-run differences are one or two ulps, 1e3 to 1e5 below the bounds, while a wrong pair, a slot
# embedding that depends on the group size, a swapped group or another image still moves a score past them
# (checked by breaking the code).


def rtagger_chain_length(model, q: int, image_hw: tuple[int, int] | None = None, n_texts: int = 0) -> int:
    """K for the error model above: the sum of each block's longest reduction along the R-Tagger's forward.

    Args:
        model: an RLIPv2ParSeD (the lengths come from its config and modules).
        q: pair slots per group (the entity decoder's self-attention has 2q keys, the relation decoder's q).
        image_hw: (H, W) of the pixels when the encoder's result differs between the two runs (another encoder
            batch, phrase features from another batch); None when both runs decode from one encoder state.
        n_texts: phrases fused with the image (entity texts + relation texts), when image_hw is given.
    """
    from torch import nn

    cfg = model.cfg
    d, lp4 = (
        cfg.d_model,
        cfg.n_levels * cfg.n_points * 4,
    )  # deformable attention: 4 bilinear corners per point
    # decoder, per layer: self-attention (a length-d projection; softmax and sum over the keys), deformable
    # cross-attention (length-d projections; sum over levels x points x corners), FFN (length d, then d_ffn);
    # then the head's length-d dot product, and the box refinement's log, division and sigmoid (4 roundings)
    k = cfg.dec_layers * (max(2 * q, d) + max(d, lp4) + cfg.d_ffn + 4)  # entity decoder
    k += cfg.dec_layers * (max(q, d) + max(d, lp4) + cfg.d_ffn + 4)  # relation decoder
    k += d
    if image_hw is None:
        return k
    h, w = image_hw
    tokens = 0
    for level in range(
        cfg.n_levels
    ):  # strides 8, 16, 32 and the extra stride-2 conv: each halves, rounding up
        h, w = -(-h // (8 if level == 0 else 2)), -(-w // (8 if level == 0 else 2))
        tokens += h * w
    convs = [
        m for part in (model.backbone, model.input_proj) for m in part.modules() if isinstance(m, nn.Conv2d)
    ]
    k += sum(
        m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] for m in convs
    )  # conv + norm each
    k += d // cfg.gn_groups * tokens  # the input projections' GroupNorms: (d / groups) x the level's pixels
    k += cfg.enc_layers * (max(d, lp4) + cfg.d_ffn)  # encoder: deformable self-attention, FFN
    # bi-attention fusion: a length-fusion_dim projection, softmax and sum over the pixels (text side) and texts
    k += cfg.n_fusion * max(cfg.fusion_dim, tokens, n_texts)
    rc = model.transformer.text_encoder.config  # RoBERTa: attention over the tokens, FFN, pooler
    k += rc.num_hidden_layers * (max(rc.hidden_size, rc.max_position_embeddings) + rc.intermediate_size)
    k += rc.hidden_size + rc.hidden_size  # pooler, resizer
    return k


def rtagger_logit_tol(model, k: int, text_varies: bool = False) -> float:
    """Bound on |z1 - z2| for a head logit z = (h + a) . pt + BIAS_C (models/rlipv2/model.py _heads) computed in two
    float32 runs at other batch shapes, k = rtagger_chain_length.

    |h| <= sqrt(d) max|g| + |b| with g, b the last decoder LayerNorm's weight and bias (a LayerNorm's normalised
    vector has norm <= sqrt(d)); |pt| <= ||W||_2 / 2 + |b_proj| (pt = projection_text(t / 2), |t| = 1). Per run,
    z is within (gamma_k [h's error, the model above] + gamma_d [the dot product, Higham (3.5) with Cauchy-Schwarz])
    |h + a| |pt| of exact, plus one rounding of |z| <= |h + a| |pt| + |BIAS_C| for the bias; text_varies adds
    gamma_k |h + a| |pt| for pt's own error when the encoder (which makes the texts) differs too. Two runs differ by
    at most twice that. Computed from the model's own tensors, so a retrained or rescaled model gets its own bound.
    """
    import torch

    from models.rlipv2.model import BIAS_C

    tr, d = model.transformer, model.cfg.d_model
    with torch.no_grad():
        h = max(
            math.sqrt(d) * float(ln.weight.abs().max()) + float(ln.bias.norm())
            for ln in (tr.ho_decoder.layers[-1].norm3, tr.verb_decoder.layers[-1].norm3)
        )
        ha = h + max(float(model.bias_obj_a.norm()), float(model.bias_pred_a.norm()))
        proj = model.projection_text
        pt = float(torch.linalg.matrix_norm(proj.weight.double(), 2)) / 2 + float(proj.bias.norm())
    per_run = ((2 if text_varies else 1) * gamma(k) + gamma(d)) * ha * pt + U32 * (ha * pt + abs(BIAS_C))
    return 2 * per_run
