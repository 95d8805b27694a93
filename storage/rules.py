"""The confidence rules and the pair-overlap test, written once: threshold, statistics and readers call these."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

#: the confidence rules: `paper` = p_subject * p_object * p_relation (RLIPv2 Sec. 4.2.2); `relation_only` =
#: p_relation (the reference code's, and the weights it trained)
RULES: tuple[str, ...] = ("paper", "relation_only")


def check_rule(rule: str) -> None:
    """Raise ValueError naming the rule when it is not one of RULES."""
    if rule not in RULES:
        raise ValueError(f"unknown confidence rule {rule!r}; expected one of {list(RULES)}")


def check_eta(eta: float) -> None:
    """Raise ValueError when eta is outside [0, 1] (NaN included)."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta {eta} is outside [0, 1]")


def rule_columns(rule: str) -> list[str]:
    """The factor columns a rule reads."""
    check_rule(rule)
    return ["p_relation"] if rule == "relation_only" else ["p_subject", "p_object", "p_relation"]


def confidence(rule: str, p_subject, p_object, p_relation) -> float:
    """A row's confidence under `rule`, in float64 from its three factors, products in the order
    (p_subject * p_object) * p_relation. NaN factors give NaN (which never passes `>= eta`)."""
    if rule == "relation_only":
        return float(p_relation)
    if rule == "paper":
        return float(p_subject) * float(p_object) * float(p_relation)
    check_rule(rule)
    raise AssertionError("unreachable")  # pragma: no cover


def confidences(table: pa.Table, rule: str) -> pa.Array:
    """`confidence` over a table's factor columns: float64, the same products in the same order (no float32
    rounding of the product or of eta); a null factor gives null."""
    check_rule(rule)
    pr = pc.cast(table["p_relation"], pa.float64())
    if rule == "relation_only":
        return pr
    ps, po = pc.cast(table["p_subject"], pa.float64()), pc.cast(table["p_object"], pa.float64())
    return pc.multiply(pc.multiply(ps, po), pr)


def passing_mask(table: pa.Table, eta: float, rule: str) -> pa.Array:
    """Rows whose confidence under `rule` >= eta (inclusive), as a boolean array; NaN and null: False."""
    return pc.fill_null(
        pc.greater_equal(confidences(table, rule), pa.scalar(float(eta), pa.float64())), False
    )


def _xywh(box) -> tuple[float, float, float, float]:
    if hasattr(box, "w"):  # storage.records.Box and the like
        return box.x, box.y, box.w, box.h
    x, y, w, h = box
    return x, y, w, h


def boxes_overlap(a, b) -> bool:
    """True when two (x, y, w, h) boxes share an area > 0: the overlap prior (RLIPv2 Tables 5 and 13).

    `a`, `b`: sequences (x, y, w, h) or objects with x, y, w, h attributes (storage.records.Box). The intersection
    must be > 0 on both axes, so boxes that touch along an edge or at a corner do not overlap, and neither does a
    box of zero width or height, even inside another. For boxes of positive size this is, in exact arithmetic, the
    reference's `check_overlap` (centre distance < half the summed sizes on both axes, strictly); that test calls a
    zero-width box inside another overlapping (the plan drops zero-area annotations, so runs never hold one), and
    its centre sums can round away an overlap of a few ulps (tests/test_rules.py). NaN coordinates: False.
    """
    ax, ay, aw, ah = _xywh(a)
    bx, by, bw, bh = _xywh(b)
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    return bool(iw > 0 and ih > 0) and not any(math.isnan(v) for v in (ax, ay, aw, ah, bx, by, bw, bh))
