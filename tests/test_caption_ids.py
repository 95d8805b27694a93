"""Original caption ids kept beside positions: captions and triplets join back to the COCO-Captions file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flows.cli import EXAMPLES, main
from models.captioners.oracle import OracleCaptioner
from storage.records import ImageRecord
from tasks.stages.caption import caption_batch

CAPTIONS = EXAMPLES / "sample_captions.json"


def _images(ids):
    return [ImageRecord(i, f"{i}.png", 10, 10, 0) for i in ids]


def test_oracle_captions_keep_the_files_annotation_ids(tmp_path):
    anns = json.loads(CAPTIONS.read_text())["annotations"]
    out = caption_batch(_images([2, 1, 99]), [OracleCaptioner(str(CAPTIONS))], None, seed=0)
    # written plainly: the file's annotations of each image in file order; position k of image i has id ...
    expected = {}
    for a in anns:
        expected.setdefault(a["image_id"], []).append((a["caption"], a["id"]))
    got = {}
    for c in out.captions:
        got.setdefault(c.image_id, []).append((c.text, c.source_id))
        assert c.caption_id == len(got[c.image_id]) - 1  # positions stay 0..n-1 per image
    assert got == {2: expected[2], 1: expected[1]}
    # a captions file without annotation ids: positions only, no source id
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a cat on a mat"}]}))
    (c,) = caption_batch(_images([1]), [OracleCaptioner(str(plain))], None, seed=0).captions
    assert (c.caption_id, c.source_id) == (0, None)


def test_a_non_integer_caption_id_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"image_id": 1, "id": "x7", "caption": "a cat"}]}))
    with pytest.raises(ValueError, match=r"annotation #0 \(image 1\) has id 'x7', not an integer"):
        OracleCaptioner(str(bad))


@pytest.mark.flow
def test_triplets_join_back_to_the_captions_file(prefect_harness, tmp_path):
    import duckdb

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    (path,) = out.glob("sample/*/triplets/*/shard-00000.parquet")
    table = pq.read_table(path)
    assert table.schema.field("caption_source_ids").type.value_type.bit_width == 64
    rows = table.to_pylist()
    assert rows
    by_id = {a["id"]: a for a in json.loads(CAPTIONS.read_text())["annotations"]}
    per_image: dict[int, list[int]] = {}
    for a in json.loads(CAPTIONS.read_text())["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["id"])
    for r in rows:
        assert len(r["caption_source_ids"]) == len(r["caption_ids"])
        for pos, src in zip(r["caption_ids"], r["caption_source_ids"]):
            assert by_id[src]["image_id"] == r["image_id"]
            assert per_image[r["image_id"]][pos] == src  # position pos of the image is that annotation
    # the join a user writes: every (triplet, caption) pair finds its caption text in the file
    n_pairs = sum(len(r["caption_ids"]) for r in rows)
    joined = duckdb.sql(
        f"""select t.image_id, c.image_id as cap_image, c.caption
            from (select image_id, unnest(caption_source_ids) as cid from read_parquet('{path}')) t
            join (select unnest(annotations, recursive := true) from read_json_auto('{CAPTIONS}')) c
              on c.id = t.cid"""
    ).fetchall()
    assert len(joined) == n_pairs and all(a == b for a, b, _ in joined)
