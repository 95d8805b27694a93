"""storage/rules.py: the confidence rules and the overlap test, against values worked out by hand."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from storage.records import Box
from storage.rules import RULES, boxes_overlap, confidence, confidences, passing_mask, rule_columns


def test_rules_and_their_columns():
    assert RULES == ("paper", "relation_only")
    assert rule_columns("paper") == ["p_subject", "p_object", "p_relation"]
    assert rule_columns("relation_only") == ["p_relation"]
    with pytest.raises(
        ValueError, match=r"unknown confidence rule 'max'; expected one of \['paper', 'relation_only'\]"
    ):
        rule_columns("max")


def test_confidence_by_hand():
    # binary fractions: exact in float32 and float64
    assert confidence("paper", 0.5, 0.25, 0.75) == 0.09375
    assert confidence("relation_only", 0.5, 0.25, 0.75) == 0.75
    assert confidence("relation_only", None, None, 0.5) == 0.5  # the other factors are not read
    assert math.isnan(confidence("paper", 0.5, float("nan"), 1.0))
    # products in the order (p_subject * p_object) * p_relation, in float64
    assert confidence("paper", 0.1, 0.2, 0.3) == (0.1 * 0.2) * 0.3 == 0.006000000000000001
    with pytest.raises(ValueError, match="unknown confidence rule 'product'"):
        confidence("product", 1, 1, 1)


def test_vectorised_confidences_equal_the_scalar_ones_and_eta_is_inclusive():
    t = pa.table({
        "p_subject": pa.array([0.5, 0.1, 1.0, None, 1.0], pa.float32()),
        "p_object": pa.array([0.5, 0.2, 1.0, 1.0, 1.0], pa.float32()),
        "p_relation": pa.array([0.8, 0.3, float("nan"), 0.5, 0.25], pa.float32()),
    })  # fmt: skip
    rows = t.to_pylist()
    for rule in RULES:
        got = confidences(t, rule).to_pylist()
        for g, r in zip(got, rows):
            want = None if r["p_subject"] is None and rule == "paper" else confidence(rule, **r)
            assert (g is None and want is None) or g == want or (math.isnan(g) and math.isnan(want)), (
                rule,
                g,
                want,
            )
    # relation_only at 0.25: 0.8 yes, float32(0.3) yes, NaN no, 0.5 yes, 0.25 yes (inclusive)
    assert passing_mask(t, 0.25, "relation_only").to_pylist() == [True, True, False, True, True]
    # paper at 0.2: 0.2 yes (0.5 * 0.5 * 0.8 in float64 from float32 factors: 0.2000000047...), ~0.006 no,
    # NaN no, null no, 0.25 yes
    assert passing_mask(t, 0.2, "paper").to_pylist() == [True, False, False, False, True]


# (a, b, overlap): boxes as (x, y, w, h)
CASES = [
    ((0, 0, 10, 10), (5, 5, 10, 10), True),  # a 5 x 5 corner shared
    ((0, 0, 10, 10), (9, 9, 10, 10), True),  # 1 x 1
    ((0, 0, 10, 10), (2, 2, 3, 3), True),  # one inside the other
    ((0, 0, 10, 10), (0, 0, 10, 10), True),  # the same box
    ((0, 0, 10, 10), (10, 0, 5, 5), False),  # touching along an edge
    ((0, 0, 10, 10), (10, 10, 5, 5), False),  # touching at a corner
    ((0, 0, 10, 10), (0, 20, 10, 10), False),  # apart on y only
    ((0, 0, 10, 10), (3, 3, 0, 4), False),  # zero width, inside: no shared area (the centre test says True)
    ((0, 0, 10, 10), (3, 3, 0, 0), False),  # a point inside
    ((0, 0, 0, 0), (0, 0, 0, 0), False),  # two identical points
    ((-5, -5, 10, 10), (4, 4, 2, 2), True),  # negative coordinates (boxes leaving the image)
    ((0, 0, 0.1 + 0.2, 1), (0.3, 0, 1, 1), True),  # float: 0.1 + 0.2 > 0.3 by one ulp
    ((0, 0, 10, 10), (float("nan"), 0, 5, 5), False),
    ((float("nan"), 0, 5, 5), (0, 0, 10, 10), False),
]


@pytest.mark.parametrize("a, b, want", CASES)
def test_boxes_overlap_by_hand(a, b, want):
    assert boxes_overlap(a, b) is want
    assert boxes_overlap(b, a) is want  # symmetric
    assert boxes_overlap(list(a), b) is want
    assert boxes_overlap(Box(1, 1, "a", *a), Box(2, 1, "b", *b)) is want  # records with x, y, w, h


def reference_check_overlap(b1, b2) -> bool:
    """The reference's test (centre distance strictly below the half-sizes' sum on both axes), as it was here."""
    cx1, cy1 = b1[0] + b1[2] / 2, b1[1] + b1[3] / 2
    cx2, cy2 = b2[0] + b2[2] / 2, b2[1] + b2[3] / 2
    return abs(cx1 - cx2) < b1[2] / 2 + b2[2] / 2 and abs(cy1 - cy2) < b1[3] / 2 + b2[3] / 2


def test_the_reference_centre_test_agrees_on_exact_boxes_of_positive_size_only():
    exact = [
        (a, b)
        for a, b, _ in CASES
        if min(a[2:] + b[2:]) > 0 and not any(map(math.isnan, a + b)) and 0.3 not in a + b
    ]
    assert len(exact) == 8
    assert all(boxes_overlap(a, b) == reference_check_overlap(a, b) for a, b in exact)
    # where they differ: a zero-width box inside another, and an overlap of one ulp that the centre sums round away
    assert reference_check_overlap((0, 0, 10, 10), (3, 3, 0, 4)) and not boxes_overlap(
        (0, 0, 10, 10), (3, 3, 0, 4)
    )
    a, b = (0, 0, 0.1 + 0.2, 1), (0.3, 0, 1, 1)
    assert boxes_overlap(a, b) and not reference_check_overlap(a, b)
