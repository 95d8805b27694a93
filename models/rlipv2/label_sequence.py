"""Label Sequence Extension: a batch's texts merged into one sequence shared by its images, extended with negative
texts sampled from the dataset's vocabulary (RLIPv1 Sec. 3.3; RLIPv2 engine.py merge_batch_data / sample_text)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch

#: the reference's split of `--negative_text_sampling N`: int(N * 2/3) entity texts, the rest relation texts
ENTITY_SHARE = 2.0 / 3.0
SAMPLING_STRATEGIES = ("freq", "random")


def merge_texts(rows: Iterable[Sequence[str]]) -> list[str]:
    """The union of the rows' texts, first seen first (the reference's merge_obj_text / merge_verb_text)."""
    return list(dict.fromkeys(t for row in rows for t in row))


def split_lengths(negative_text_sampling: int) -> tuple[int, int]:
    """(entity texts, relation texts) a batch is extended to: (int(N * 2/3), N - int(N * 2/3)); 500 -> (333, 167).
    The entity count excludes "no objects", which the reference appends after sampling (use_no_obj_token)."""
    n_ent = int(negative_text_sampling * ENTITY_SHARE)
    return n_ent, negative_text_sampling - n_ent


def text_frequencies(images) -> dict:
    """Name frequencies of VGImage-like records in the form of `RelationDataset.class_frequencies()`:
    {relationship_names, object_names, relationship_freq, object_freq}, most frequent first, equal counts in
    first-seen order (the reference's stable sort). Objects: every box; relations: every relation row."""
    obj: Counter = Counter()
    rel: Counter = Counter()
    for im in images:
        for o in im.objects:
            obj[o.name] += 1
        for r in im.relationships:
            rel[r.predicate] += 1
    # Counter keeps insertion (first-seen) order; sorted() is stable, reverse=True keeps ties in that order
    rel_d = dict(sorted(rel.items(), key=lambda kv: kv[1], reverse=True))
    obj_d = dict(sorted(obj.items(), key=lambda kv: kv[1], reverse=True))
    return {
        "relationship_names": list(rel_d),
        "object_names": list(obj_d),
        "relationship_freq": rel_d,
        "object_freq": obj_d,
    }


def extend_texts(
    texts: Sequence[str],
    length: int,
    names: Sequence[str],
    counts: Sequence[int],
    strategy: str = "freq",
    generator: torch.Generator | None = None,
) -> list[str]:
    """`texts` extended to `length` with texts drawn from the vocabulary `names` (the reference's sample_text).

    "freq": u ~ U(0, 1), the first name whose cumulative frequency share is >= u (so a name is drawn with
    probability count / total); "random": a name drawn uniformly. A drawn name already in the list is drawn
    again. Draws come from `generator` (torch), 256 at a time; the same generator state gives the same texts.

    reltag's guard: the reference loops forever when the vocabulary plus `texts` holds fewer than `length`
    distinct texts; here every missing vocabulary name is appended in vocabulary order instead (no draws).

    Returns a new list; `texts` itself is returned unchanged (copied) when it is already `length` or longer.
    """
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling strategy {strategy!r} is not one of {SAMPLING_STRATEGIES}")
    if len(names) != len(counts):
        raise ValueError(f"{len(names)} vocabulary names but {len(counts)} counts")
    out = list(texts)
    if len(out) >= length:
        return out
    have = set(out)
    missing = [n for n in names if n not in have]
    if len(out) + len(missing) <= length:
        return out + missing
    if strategy == "freq":
        c = torch.tensor(list(counts), dtype=torch.float64)
        if bool((c < 0).any()) or float(c.sum()) <= 0:
            raise ValueError(
                f"vocabulary counts must be >= 0 with a positive sum, got total {float(c.sum())}"
            )
        cum = c.cumsum(0) / c.sum()
    while len(out) < length:
        u = torch.rand(256, generator=generator, dtype=torch.float64)
        if strategy == "freq":
            # first i with u <= cum[i]; the float cumsum may end just below 1, so clamp to the last name
            idx = torch.searchsorted(cum, u, side="left").clamp(max=len(names) - 1)
        else:
            idx = (u * len(names)).long().clamp(max=len(names) - 1)
        for i in idx.tolist():
            t = names[i]
            if t not in have:
                out.append(t)
                have.add(t)
                if len(out) == length:
                    break
    return out


def batch_texts(
    entity_rows: Iterable[Sequence[str]],
    relation_rows: Iterable[Sequence[str]],
    frequencies: dict | None = None,
    negative_text_sampling: int = 0,
    strategy: str = "freq",
    generator: torch.Generator | None = None,
) -> tuple[list[str], list[str]]:
    """One batch's shared (entity texts, relation texts): each merged over the images, first seen first, then
    extended to `split_lengths(negative_text_sampling)` from `frequencies` (`object_names` / `object_freq`,
    `relationship_names` / `relationship_freq`). Entities are drawn first, then relations, from one generator.
    Without `frequencies` (or N = 0) the merged texts are returned as they are. "no objects" is not added here.
    """
    ents, rels = merge_texts(entity_rows), merge_texts(relation_rows)
    if frequencies is None or negative_text_sampling <= 0:
        return ents, rels
    n_ent, n_rel = split_lengths(negative_text_sampling)
    on, rn = frequencies["object_names"], frequencies["relationship_names"]
    ents = extend_texts(ents, n_ent, on, [frequencies["object_freq"][n] for n in on], strategy, generator)
    rels = extend_texts(
        rels, n_rel, rn, [frequencies["relationship_freq"][n] for n in rn], strategy, generator
    )
    return ents, rels
