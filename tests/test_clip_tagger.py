"""CLIP tagger baseline (paper Table 5): a tiny random CLIP saved and loaded through the real path, its scores
against a plain float64 computation, the prompts, the crop, the run key, and a run with tag.tagger: clip."""

from __future__ import annotations

import json
import math
import shutil
import string

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.clip_tagger import (
    HUB_ID,
    SCALE,
    ClipQuery,
    ClipRelationScorer,
    crop_union,
    no_relation_prompt,
    relation_prompt,
    union_box,
)
from storage.records import Box, Candidate, ImageRecord
from tasks.config import PipelineConfig, TagConfig, ThresholdConfig
from tasks.stages.tag.clip import tag_batch_clip
from tasks.stages.threshold import threshold_batch
from tests.tolerances import U32, assert_within, gamma, sigmoid_tol, unit_embedding_err

SIZE = 32  # the tiny vision encoder's input side
PATCH, INTERMEDIATE, PROJECTION = 8, 64, 16  # the tiny CLIP's patch side, MLP width and embedding width


def batch_tol(p, image_varies: bool = True) -> np.ndarray:
    """Bound on |p1 - p2| for p_relation computed twice in float32 with the encoders at other batch shapes.

    Each run's unit embeddings are within e_img, e_txt of exact (tests/tolerances.py unit_embedding_err: the
    longest reductions are the patch convolution, 3 * 8 * 8 = 192 terms, and the text MLP's 64). A cosine of unit
    vectors is then within e_img + e_txt + e_img e_txt + gamma_16 (its own dot product of 16 terms) of exact, a
    logit 100 cos within 100 times that plus one rounding of |logit| <= 100, and the logit difference of the
    two-way softmax within twice a logit's bound plus one rounding of |difference| <= 200. Two runs differ by the
    sum of their errors; p = sigmoid(difference) moves by at most p (1 - p) (e^d - 1) (sigmoid_tol), and the
    softmax's own exp, sum and division round p by up to gamma_5 p in each run. When both runs encode the crop
    in the same batch shape (image_varies=False) its embedding is the same bits in both and only the text side
    counts. About 3.4e-3 at p = 1/2, 1.2e-3 at p = 0.1, 1.4e-6 at p = 1e-4: a swapped row, another crop or a
    dropped image moves this test's scores by 7e-3 or more (they are 0.007 to 0.9 apart), rounding by ~1e-5 p(1 - p).
    """
    e_img = unit_embedding_err(3 * PATCH * PATCH, PROJECTION) if image_varies else 0.0
    e_txt = unit_embedding_err(INTERMEDIATE, PROJECTION)
    e_cos = e_img + e_txt + e_img * e_txt + gamma(PROJECTION)
    e_logit = SCALE * e_cos + SCALE * U32
    e_diff = 2 * e_logit + 2 * SCALE * U32
    p = np.asarray(p, dtype=np.float64)
    return sigmoid_tol(p, 2 * e_diff) + 2 * gamma(5) * p


def build_tiny_clip(path: str, seed: int = 0) -> str:
    """A CLIP with 2-layer text and vision transformers (hidden 32, projection 16), random weights, saved as
    safetensors with a byte-level BPE tokenizer (letters and digits, a few merges) and a PIL image processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["o n</w>", "o f</w>", "t h", "th e</w>", "i n", "in g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    with open(f"{path}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{path}/merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    # loaded from vocab.json + merges.txt, the files CLIP's hub repository has
    tokenizer = CLIPTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).eval().save_pretrained(path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipRelationScorer.load(clip_dir)


def _image(w=120, h=90, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_prompts_are_the_reference_codes():
    assert relation_prompt("person", "riding", "horse") == "a photo of person riding horse"
    assert no_relation_prompt("person", "horse") == "a photo of person having no relation with horse"
    assert (SCALE, ThresholdConfig().clip_eta, HUB_ID) == (100.0, 0.8, "openai/clip-vit-large-patch14")


def test_union_box_and_crop_follow_pil_rounding():
    assert union_box((10, 20, 30, 5), (25, 2, 50, 10)) == (10, 2, 75, 25)
    im = _image()
    # union (10.4, 2, 75.2, 25.6) -> (10, 2, 75, 26)
    crop = crop_union(im, (10.4, 20.6, 30, 5), (25, 2, 50.2, 10))
    assert crop.size == (65, 24)
    assert np.array_equal(np.asarray(crop), np.asarray(im)[2:26, 10:75])
    # a box under half a pixel wide rounds away: nothing to show CLIP (the reference skips such pairs)
    assert crop_union(im, (3.1, 3, 0.2, 1), (3.2, 3, 0.1, 1)) is None
    assert crop_union(im, (3, 3, 0, 10), (10, 10, 5, 5)) is None


def test_loads_through_the_real_path(clip_dir, scorer):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    assert isinstance(scorer.model, CLIPModel) and isinstance(scorer.tokenizer, CLIPTokenizer)
    assert isinstance(scorer.image_processor, CLIPImageProcessorPil)
    assert scorer.image_processor.crop_size["height"] == SIZE and scorer.max_text_tokens == 77
    ids = scorer.tokenizer("a photo of the thing")["input_ids"]
    toks = scorer.tokenizer.convert_ids_to_tokens(ids)
    # byte-level BPE with the merges of merges.txt, framed by CLIP's start/end tokens
    assert toks == [
        "<|startoftext|>",
        "a</w>",
        "p",
        "h",
        "o",
        "t",
        "o</w>",
        "of</w>",
        "the</w>",
        "th",
        "ing</w>",
        "<|endoftext|>",
    ]


def test_load_names_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="CLIP model directory .*nope' does not exist"):
        ClipRelationScorer.load(str(tmp_path / "nope"))


def _reference_scores(clip_dir, image, queries):
    """Plain float64 computation: crop by array slicing, resize + centre crop + normalise by hand, the tiny
    model's own get_image_features / get_text_features in double, cosine x 100, 2-way softmax."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).double().eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    arr = np.asarray(image)
    out = []
    for q in queries:
        (sx, sy, sw, sh), (ox, oy, ow, oh) = q.subject_box, q.object_box
        x0, y0 = round(min(sx, ox)), round(min(sy, oy))
        x1, y1 = round(max(sx + sw, ox + ow)), round(max(sy + sh, oy + oh))
        crop = Image.fromarray(arr[y0:y1, x0:x1])
        w, h = crop.size
        nw, nh = (SIZE, int(SIZE * h / w)) if w <= h else (int(SIZE * w / h), SIZE)
        r = np.asarray(crop.resize((nw, nh), Image.BICUBIC), dtype=np.float64)
        top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
        px = (r[top : top + SIZE, left : left + SIZE] / 255.0 - mean) / std
        pv = torch.from_numpy(px.transpose(2, 0, 1)[None].copy())
        texts = [
            f"a photo of {q.subject_label} {q.relation} {q.object_label}",
            f"a photo of {q.subject_label} having no relation with {q.object_label}",
        ]
        with torch.no_grad():
            v = model.get_image_features(pixel_values=pv).pooler_output[0]
            t = torch.stack(
                [model.get_text_features(**tok(x, return_tensors="pt")).pooler_output[0] for x in texts]
            )
        cos = (t @ v) / (t.norm(dim=-1) * v.norm())
        out.append(float(torch.softmax(100.0 * cos, -1)[0]))
    return out


def test_scores_match_a_plain_float64_computation(clip_dir, scorer):
    im = _image(160, 100, seed=1)
    queries = [
        ClipQuery((10, 12, 40, 60), (30, 20, 90, 30), "person", "riding", "horse"),
        ClipQuery((10, 12, 40, 60), (30, 20, 90, 30), "person", "next to", "horse"),  # same crop, other text
        ClipQuery((100.6, 50.2, 20, 45.7), (5, 70, 31.5, 25), "dog", "on", "sofa"),  # wide, float corners
        ClipQuery((60, 5, 8, 90), (62, 40, 4, 10), "man", "holding", "cup"),  # tall crop
    ]
    got, stats = scorer.score([im], [queries])
    ref = _reference_scores(clip_dir, im, queries)
    worst = max(abs(a - b) for a, b in zip(got[0], ref))
    assert worst < 1e-5, f"worst |clip - float64| = {worst:.3g}: {got[0]} vs {ref}"
    assert stats == {"crops": 3, "unscored": 0, "texts": 7, "forwards": 1}
    assert len({round(s, 6) for s in got[0]}) == 4  # the scores depend on crop and text


def test_batching_and_crop_chunks_do_not_change_scores(clip_dir):
    a, b = _image(seed=2), _image(70, 130, seed=3)
    qa = [ClipQuery((5, 5, 30, 30), (20, 10, 60, 50), "person", "on", "bench")]
    qb = [ClipQuery((k, k, 20 + k, 30), (10, 40, 30, 60 + k), "cup", "on", "table") for k in range(0, 30, 3)]
    alone = ClipRelationScorer.load(clip_dir)
    chunked = ClipRelationScorer.load(clip_dir)
    chunked.crops_per_forward = 3
    sa, _ = alone.score([a], [qa])
    sb, _ = alone.score([b], [qb])
    both, stats = chunked.score([a, b], [qa, qb])
    assert stats["forwards"] == math.ceil(11 / 3)
    # crops in forwards of 1 and 10 vs 3, 3, 3, 2, prompts in 2 + 2 vs 4: float32 GEMMs block and so round
    # differently (batch_tol derives the bound); observed up to 3.3e-6 on an AVX-512 CPU
    expected = sa[0] + sb[0]
    assert_within(both[0] + both[1], expected, batch_tol(expected), "p_relation, chunked vs alone")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("float16", 2e-2)])
def test_cuda_scores_match_the_cpu(clip_dir, scorer, dtype, atol):
    im = _image(seed=4)
    qs = [ClipQuery((5, 5, 30, 30), (20, 10, 60, 50), "person", r, "bench") for r in ("on", "near", "at")]
    cpu, _ = scorer.score([im], [qs])
    gpu, _ = ClipRelationScorer.load(clip_dir, device="cuda", dtype=dtype).score([im], [qs])
    worst = max(abs(a - b) for a, b in zip(cpu[0], gpu[0]))
    assert worst < atol, f"worst |cuda {dtype} - cpu| = {worst:.3g}"


def test_device_and_dtype_are_validated(clip_dir):
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        ClipRelationScorer.load(clip_dir, dtype="int8")
    with pytest.raises(ValueError, match="CLIP tagger device 'tpu9' is not a torch device"):
        ClipRelationScorer.load(clip_dir, device="tpu9")


def _record():
    return ImageRecord(
        7,
        "x.png",
        120,
        90,
        0,
        [
            Box(1, 1, "person", 10, 10, 40, 60),
            Box(2, 5, "horse", 30, 20, 80, 50),
            Box(3, 5, "horse", 100, 80, 0.2, 0.3),  # rounds to no pixel with box 4
            Box(4, 1, "person", 100.1, 80.1, 0.2, 0.2),
        ],
    )


def _cand(s, o, rel, sl="person", ol="horse", caps=(0,)):
    return Candidate(7, s, o, 1, 5, sl, ol, rel, rel, list(caps), len(caps), "name", sl, "name", ol)


def test_tag_batch_clip_rows(scorer):
    im, px = _record(), _image()
    cands = [_cand(1, 2, "riding"), _cand(1, 2, "feeding", caps=(0, 1)), _cand(4, 3, "near")]
    rows, stats = tag_batch_clip([im], [px], cands, scorer, TagConfig(tagger="clip"))
    (ride, feed), (near,) = rows[:2], rows[2:]
    direct, _ = scorer.score(
        [px],
        [
            [
                ClipQuery((10, 10, 40, 60), (30, 20, 80, 50), "person", r, "horse")
                for r in ("riding", "feeding")
            ]
        ],
    )
    # the same one crop in a forward of 1 both times (same bits), but 4 prompts in one text forward vs 3: the
    # text GEMMs round differently (observed 6e-7 on an AVX-512 CPU), bound by batch_tol's text side
    assert_within(
        [ride.p_relation, feed.p_relation], direct[0], batch_tol(direct[0], image_varies=False), "tag rows"
    )
    for r in (ride, feed):
        assert (
            r.tagger == "clip" and r.p_subject == 1.0 and r.p_object == 1.0 and r.confidence == r.p_relation
        )
    assert {ride.relation_rank, feed.relation_rank} == {1, 2}
    assert (ride.relation_rank == 1) == (ride.p_relation > feed.p_relation)
    assert feed.caption_ids == [0, 1] and feed.n_captions == 2
    assert math.isnan(near.p_relation) and near.relation_rank == 1  # empty crop: not scored
    assert stats["clip_crops"] == 1 and stats["clip_unscored"] == 1 and len(rows) == 3
    # the threshold stage holds clip rows to clip_eta (0.8 by default, the reference's) and rejects the NaN
    acc, rej, tstats = threshold_batch([im], rows, ThresholdConfig(), "rk")
    assert {r.reason for r in rej if r.relation == "near"} == {"nan_confidence"}
    for r in rows[:2]:
        assert (r.relation in {a.relation for a in acc}) == (r.p_relation >= 0.8)
    acc0, _, _ = threshold_batch([im], rows, ThresholdConfig(clip_eta=0.0), "rk")
    assert sorted(a.relation for a in acc0) == ["feeding", "riding"]


def test_tag_batch_clip_names_bad_inputs(scorer):
    im, px = _record(), _image()
    with pytest.raises(ValueError, match="names box 99, which the image does not have"):
        tag_batch_clip([im], [px], [_cand(1, 99, "on")], scorer, TagConfig(tagger="clip"))
    with pytest.raises(ValueError, match=r"decoded size \(50, 50\) != record size \(120, 90\)"):
        tag_batch_clip([im], [_image(50, 50)], [_cand(1, 2, "on")], scorer, TagConfig(tagger="clip"))


def test_clip_model_revision_enters_the_run_key(clip_dir, tmp_path):
    from tasks.run.registry import chain, revisions

    def keys(c):
        return {link.stage: link.key for link in chain(c, {"annotations_sha256": "x"})[1]}

    hub = PipelineConfig.model_validate({"tag": {"tagger": "clip"}})
    assert revisions(hub, {})["tagger"] == f"clip:{HUB_ID}@main"
    pinned = PipelineConfig.model_validate({"tag": {"tagger": "clip", "clip_revision": "abc123"}})
    assert revisions(pinned, {})["tagger"] == f"clip:{HUB_ID}@abc123"
    local = str(tmp_path / "clip")
    shutil.copytree(clip_dir, local)
    cfg = PipelineConfig.model_validate({"tag": {"tagger": "clip", "clip_model": local}})
    before = revisions(cfg, {})
    assert before["tagger"].startswith("clip:local:")
    k_before = keys(cfg)
    conf = json.loads(open(f"{local}/config.json").read())
    conf["projection_dim"] = 8
    with open(f"{local}/config.json", "w") as f:
        json.dump(conf, f)
    after = revisions(cfg, {})
    assert after["tagger"] != before["tagger"]
    k_after = keys(cfg)
    assert k_after["tag"] != k_before["tag"] and k_after["match"] == k_before["match"]
    # the cut enters the threshold stage's key (and the run's), not the tagger's
    cut = cfg.model_copy(update={"threshold": ThresholdConfig(clip_eta=0.5)})
    k_cut = keys(cut)
    assert k_cut["threshold"] != k_after["threshold"] and k_cut["tag"] == k_after["tag"]
    assert k_cut["write"] != k_after["write"]


@pytest.mark.flow
@pytest.mark.slow
def test_a_run_with_the_clip_tagger_writes_triplets(prefect_harness, clip_dir, tmp_path):
    from flows.cli import EXAMPLES, main
    from flows.status import find_runs, run_status

    out = tmp_path / "out"
    cfg_file = tmp_path / "clip.yaml"
    # a random CLIP's softmax rarely reaches 0.8, so the cut is lowered to see triplets; top_k exercises the filter
    cfg_file.write_text(
        f"tag: {{tagger: clip, clip_model: {clip_dir}}}\nthreshold: {{clip_eta: 0.0, top_k: 1}}\n"
    )
    args = [
        "run",
        "--annotations",
        str(EXAMPLES / "sample_detections.json"),
        "--images",
        str(EXAMPLES / "images"),
        "--captions",
        str(EXAMPLES / "sample_captions.json"),
        "--out",
        str(out),
        "--dataset",
        "clip",
        "--config",
        str(cfg_file),
    ]
    assert main(args) == 0
    (run,) = find_runs(str(out))
    assert run_status(run)["complete"]
    tags = pq.read_table(run.stage_batch("tag", 0, 0)).to_pylist()
    trip = pq.read_table(run.triplets(0)).to_pylist()
    assert trip and all(t["tagger"] == "clip" for t in trip)
    for t in trip:
        assert t["p_subject"] == 1.0 and t["p_object"] == 1.0 and 0.0 <= t["p_relation"] <= 1.0
        assert t["confidence"] == pytest.approx(t["p_relation"])
    pairs = [(t["image_id"], t["subject_ann_id"], t["object_ann_id"]) for t in trip]
    assert len(pairs) == len(set(pairs))  # top_k: 1
    rejects = pq.read_table(run.rejects(0, 0)).to_pylist()
    assert len(trip) + len(rejects) == len(tags)
    assert "beyond_top_k" in {r["reason"] for r in rejects} <= {"beyond_top_k", "nan_confidence"}
    manifest = json.loads(open(run.manifest).read())
    assert manifest["revisions"]["tagger"].startswith("clip:local:")
    stats = json.loads(open(run.run_stats).read())
    assert stats["stages"]["tag"]["clip_crops"] >= 1 and stats["stages"]["tag"]["forwards"] >= 1
