"""The flow with real model code: BLIP captions (tiny, random weights, loaded from disk) and the R-Tagger
(a tiny reference-layout checkpoint converted by models.rlipv2.convert) on the bundled photographs, through `reltag run`, plus a corrupt image quarantined."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import EXAMPLES, main
from flows.status import find_runs, run_status
from models.rlipv2.tokenizer import build_word_tokenizer
from storage import schemas
from storage.records import Quarantined
from tests.tiny_models import build_tiny_blip

pytestmark = [pytest.mark.flow, pytest.mark.slow]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """BLIP (tiny, random) and an R-Tagger converted from a reference-layout checkpoint (.pth with args), the
    way a user turns the authors' released weights into a reltag checkpoint."""
    import argparse
    import dataclasses

    from transformers import RobertaConfig

    from models.rlipv2.convert import main as convert_main
    from tests.rlipv2_reference import TINY, reference_state_dict

    d = tmp_path_factory.mktemp("models")
    build_tiny_blip(str(d / "blip"))
    sizes = dataclasses.replace(TINY, n_q=100)  # 200 queries, as the released tagger
    words = ["person", "helmet", "cup", "plate", "spoon", "camera", "tripod", "gloves", "flag", "on", "next",
             "to", "with", "holding", "wearing", "near", "beside", "of", "in", "at", "sitting", "no", "objects"]  # fmt: skip
    text_dir = d / "roberta-tiny"
    RobertaConfig(**sizes.text_config()).save_pretrained(text_dir)
    build_word_tokenizer(words, text_dir)
    args = argparse.Namespace(hidden_dim=sizes.d, nheads=sizes.heads, enc_n_points=sizes.points,
                              dec_n_points=sizes.points, num_queries=2 * sizes.n_q, fusion_type="GLIP_attn",
                              fusion_interval=2, fusion_last_vis=True, with_box_refine=True, backbone="resnet50")  # fmt: skip
    torch.save({"model": reference_state_dict(sizes, seed=3), "epoch": 19, "args": args}, d / "tagger.pth")
    rc = convert_main(["--reference", str(d / "tagger.pth"), "--text-model", str(text_dir), "--out",
                       str(d / "rtagger"), "--vocabulary", "o365"])  # fmt: skip
    assert rc == 0
    return d


def test_blip_and_rtagger_through_the_cli(prefect_harness, models_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(EXAMPLES / "images", images)
    (images / "chelsea.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # one image cannot be decoded
    out = tmp_path / "out"
    # tiny random models produce arbitrary text, so the relations come from human captions of the same images
    # for the match stage; BLIP's captions are checked for shape and provenance
    args = [
        "run",
        "--annotations",
        str(EXAMPLES / "sample_detections.json"),
        "--images",
        str(images),
        "--captions",
        str(EXAMPLES / "sample_captions.json"),
        "--out",
        str(out),
        "--dataset",
        "models",
        "--captioner",
        "oracle,blip",
        "--caption-model",
        str(models_dir / "blip"),
        "--n-cap",
        "3",
        "--tagger",
        "rtagger",
        "--checkpoint",
        str(models_dir / "rtagger"),
        "--eta",
        "0.0",
    ]
    assert main(args) == 0
    (run,) = find_runs(str(out))
    assert run_status(run)["complete"]
    caps = pq.read_table(run.stage_batch("caption", 0, 0)).to_pylist()
    blip = [c for c in caps if c["captioner"].startswith("blip")]
    assert len(blip) == 3 * 4  # 3 captions for each of the 4 decodable images
    assert all(not c["text"].startswith("a picture of") for c in blip)
    # the broken file is refused at planning (its header does not decode), so no stage after it sees it
    q = schemas.from_table(pq.read_table(run.quarantine("plan")), Quarantined)
    assert [(x.image_id, x.reason, x.record) for x in q] == [(4, "decode_error", "chelsea.png")]
    assert not os.path.exists(run.quarantine("caption", 0, 0))
    trip = pq.read_table(run.triplets(0)).to_pylist()
    assert trip and all(t["tagger"] == "rtagger" for t in trip)
    for t in trip:
        assert 0 <= t["p_subject"] <= 1 and 0 <= t["p_object"] <= 1 and 0 <= t["p_relation"] <= 1
        assert t["confidence"] == pytest.approx(t["p_subject"] * t["p_object"] * t["p_relation"], rel=1e-5)
    manifest = json.loads(open(run.manifest).read())
    assert manifest["revisions"]["tagger"].startswith("rtagger:local:")
    assert manifest["revisions"]["captioners"][1].startswith("blip:local:")
    stats = json.loads(open(run.run_stats).read())
    assert stats["stages"]["tag"]["forwards"] >= 1 and stats["stages"]["caption"]["quarantined"] == 0
    assert stats["plan"]["quarantined_decode_error"] == 1 and stats["stages"]["verify"]["verified"] == 4


def test_blip_input_size_must_fit_the_vision_encoder(models_dir):
    from tasks.config import CaptionConfig
    from tasks.stages.caption import build_captioners

    with pytest.raises(
        ValueError, match=r"caption image_size 384 does not fit the BLIP captioner .* takes \d+x\d+"
    ):
        build_captioners(
            CaptionConfig(captioner="blip", model=str(models_dir / "blip"), image_size=384), None
        )
    (cap,) = build_captioners(CaptionConfig(captioner="blip", model=str(models_dir / "blip")), None)
    assert cap.image_size == cap.processor.image_processor.size["height"] != 384
