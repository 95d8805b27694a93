"""BLIP / BLIP-2 captioners on tiny random-weight models saved with save_pretrained and loaded back by path."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from models.captioners.blip import BlipCaptioner, decode_loop
from models.captioners.blip2 import Blip2Captioner
from models.captioners.sampling import generation_processors, image_seed
from storage.records import Caption, ImageRecord
from storage.schemas import to_table
from tasks.config import CaptionConfig
from tasks.stages.caption import batch_seed, build_captioners, caption_batch
from tests.tiny_models import SIZE, build_tiny_blip, build_tiny_blip2, draw_images


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip(str(tmp_path_factory.mktemp("tiny_blip")))


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return build_tiny_blip2(str(tmp_path_factory.mktemp("tiny_blip2")))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return str(root), draw_images(str(root), 5)


def _pixels(root, recs):
    return [Image.open(os.path.join(root, r.file_name)).convert("RGB") for r in recs]


def _cfg(blip_dir, **kw) -> CaptionConfig:
    base = dict(
        captioner="blip", model=blip_dir, image_size=SIZE, n_cap=4, max_length=14, min_length=8, batch_size=3
    )
    base.update(kw)
    return CaptionConfig(**base)


def test_loads_local_dir_safetensors_with_content_revision(blip_dir):
    assert os.path.exists(os.path.join(blip_dir, "model.safetensors"))
    assert not os.path.exists(os.path.join(blip_dir, "pytorch_model.bin"))
    (cap,) = build_captioners(_cfg(blip_dir), None)
    assert isinstance(cap, BlipCaptioner)
    assert cap.name == f"blip:{blip_dir}"
    assert cap.revision.startswith("local-sha256:") and len(cap.revision) == len("local-sha256:") + 16
    assert cap.prompt_ids[0] == cap.model.config.text_config.bos_token_id and len(cap.prompt_ids) == 4
    assert cap.image_size == SIZE and cap.processor.image_processor.size["height"] == SIZE


def test_n_cap_captions_prompt_stripped_lengths_respected(blip_dir, photos):
    root, recs = photos
    (cap,) = build_captioners(_cfg(blip_dir), None)
    pix = _pixels(root, recs)
    out = cap.caption(recs, pix, seed=11)
    assert len(out) == len(recs) and all(len(c) == 4 for c in out)
    assert all(isinstance(t, str) for c in out for t in c)
    assert not any(t.startswith("a picture of") for c in out for t in c)
    seqs = cap.sample(cap.pixel_values(pix), [image_seed(11, r.image_id) for r in recs])
    assert seqs.shape[0] == len(recs) * 4 and seqs.shape[1] <= 14
    assert (seqs[:, :4] == torch.tensor(cap.prompt_ids)).all()  # prompt in the sequence, not in the text
    for row in seqs.tolist():
        if cap.eos in row:
            # min_length 8 counts the 4 prompt tokens: EOS cannot come before position 7 (0-based).
            assert row.index(cap.eos) >= 7, row
    texts = cap.tokenizer.batch_decode(seqs[:, 4:], skip_special_tokens=True)
    assert [t.strip() for t in texts] == [t for c in out for t in c]


def test_sampling_reproducible_seed_dependent_and_batch_independent(blip_dir, photos):
    root, recs = photos
    (cap,) = build_captioners(_cfg(blip_dir), None)
    pix = _pixels(root, recs)
    a = cap.caption(recs, pix, seed=5)
    assert a == cap.caption(recs, pix, seed=5)
    assert a != cap.caption(recs, pix, seed=6)
    # An image's captions do not depend on the other images of its generate call.
    assert cap.caption(recs[2:3], pix[2:3], seed=5) == [a[2]]
    assert cap.caption(recs[::-1], pix[::-1], seed=5) == a[::-1]
    # And they do depend on the image: the tiny model is not blind.
    assert len({tuple(c) for c in a}) > 1


def test_beam_search_when_n_cap_is_1_deterministic_and_equal_to_transformers(blip_dir, photos):
    root, recs = photos
    (cap,) = build_captioners(_cfg(blip_dir, n_cap=1, num_beams=3), None)
    assert cap.sampling()["mode"] == "beam" and cap.sampling()["num_beams"] == 3
    pix = _pixels(root, recs)
    a = cap.caption(recs, pix, seed=1)
    assert all(len(c) == 1 for c in a)
    assert a == cap.caption(recs, pix, seed=999)  # beam search ignores the seed
    pv = cap.pixel_values(pix)
    ids = torch.tensor([cap.prompt_ids + [cap.eos]]).repeat(len(recs), 1)
    # BLIP's generate passes repetition_penalty=1.0 to beam search (1.1 is for nucleus sampling only)
    assert cap.beam_repetition_penalty == 1.0 and cap.sampling()["repetition_penalty"] == 1.0
    with torch.inference_mode():
        ref = cap.model.generate(
            pixel_values=pv, input_ids=ids, num_beams=3, max_length=14, min_length=8, repetition_penalty=1.0
        )
    ref_txt = [t.strip() for t in cap.tokenizer.batch_decode(ref[:, 4:], skip_special_tokens=True)]
    assert [c[0] for c in a] == ref_txt


def test_beam_and_nucleus_repetition_penalties_are_separate(blip_dir, photos):
    assert CaptionConfig().repetition_penalty == 1.1 and CaptionConfig().beam_repetition_penalty == 1.0
    root, recs = photos
    pix = _pixels(root, recs)
    cap = BlipCaptioner.load(
        blip_dir,
        image_size=SIZE,
        n_cap=1,
        num_beams=3,
        max_length=14,
        min_length=8,
        beam_repetition_penalty=3.0,
    )
    assert cap.repetition_penalty == 1.1  # nucleus keeps the paper's 1.1
    assert cap.sampling()["mode"] == "beam" and cap.sampling()["repetition_penalty"] == 3.0
    pv = cap.pixel_values(pix)
    ids = torch.tensor([cap.prompt_ids + [cap.eos]]).repeat(len(recs), 1)
    common = dict(pixel_values=pv, input_ids=ids, num_beams=3, max_length=14, min_length=8)
    with torch.inference_mode():
        ours = cap.beam(pv)
        want = cap.model.generate(**common, repetition_penalty=3.0)
        plain = cap.model.generate(**common, repetition_penalty=1.0)
    assert torch.equal(ours, want)
    assert not torch.equal(want, plain)  # the penalty reaches the search: the test can fail
    # nucleus sampling still applies 1.1, whatever the beam setting
    nuc = BlipCaptioner.load(blip_dir, image_size=SIZE, n_cap=4, max_length=14, min_length=8)
    assert nuc.sampling()["mode"] == "nucleus" and nuc.sampling()["repetition_penalty"] == 1.1
    with pytest.raises(ValueError, match="beam_repetition_penalty=0.0"):
        BlipCaptioner(cap.model, cap.processor, name="x", revision="r", beam_repetition_penalty=0.0)


def test_decode_loop_logits_equal_transformers_forward(blip_dir, photos):
    """The fused loop (image K/V once, folded queries, prompt once) computes the decoder's own logits."""
    root, recs = photos
    (cap,) = build_captioners(_cfg(blip_dir), None)
    pv = cap.pixel_values(_pixels(root, recs[:3]))
    seen = []

    def pick(scores):
        seen.append(scores.clone())
        return scores.argmax(-1)

    with torch.inference_mode():
        emb = cap.model.vision_model(pixel_values=pv)[0]
        seqs = decode_loop(
            cap.model.text_decoder,
            emb,
            cap.prompt_ids,
            2,
            LogitsProcessorList(),
            pick,
            max_length=12,
            eos=-1,
            pad=0,
        )
        ref = cap.model.text_decoder(
            input_ids=seqs, encoder_hidden_states=emb.repeat_interleave(2, 0), use_cache=False
        ).logits
    got = torch.stack(seen, 1)  # [B*n, steps, V]
    want = ref[:, 3:-1]  # logits that predicted tokens 4.. (prompt is 4 tokens)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"worst |logit difference| {err}"


def test_greedy_decode_loop_equals_transformers_generate(blip_dir, photos):
    root, recs = photos
    (cap,) = build_captioners(_cfg(blip_dir), None)
    pv = cap.pixel_values(_pixels(root, recs))
    procs = generation_processors(
        repetition_penalty=1.1, min_length=8, eos_token_id=cap.eos, top_k=50, top_p=0.9, do_sample=False
    )
    ids = torch.tensor([cap.prompt_ids + [cap.eos]]).repeat(len(recs), 1)
    with torch.inference_mode():
        emb = cap.model.vision_model(pixel_values=pv)[0]
        ours = decode_loop(
            cap.model.text_decoder,
            emb,
            cap.prompt_ids,
            1,
            procs,
            lambda s: s.argmax(-1),
            max_length=14,
            eos=cap.eos,
            pad=cap.pad,
        )
        ref = cap.model.generate(
            pixel_values=pv,
            input_ids=ids,
            do_sample=False,
            max_length=14,
            min_length=8,
            repetition_penalty=1.1,
        )
    assert ours.shape[1] <= 14 and ref.shape[1] <= 14
    width = max(ours.shape[1], ref.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=cap.pad)  # noqa: E731
    assert torch.equal(pad(ours), pad(ref))


def test_caption_batch_end_to_end_with_quarantine(blip_dir, photos, tmp_path):
    root, recs = photos
    import shutil

    for r in recs:
        shutil.copy(os.path.join(root, r.file_name), tmp_path / r.file_name)
    Image.new("CMYK", (80, 60), (0, 200, 100, 0)).save(tmp_path / "cmyk.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    batch = [
        *recs[:2],
        ImageRecord(7, "cmyk.jpg", 80, 60, 0),
        ImageRecord(8, "broken.jpg", 80, 60, 0),
        recs[2],
    ]
    cfg = _cfg(blip_dir)
    caps = build_captioners(cfg, None)
    out = caption_batch(batch, caps, str(tmp_path), seed=batch_seed("rk", 0, 0), cfg=cfg)
    assert [q.record for q in out.quarantine] == ["broken.jpg"]
    assert out.quarantine[0].reason == "decode_error" and "broken.jpg" in out.quarantine[0].detail
    assert out.quarantine[0].image_id == 8 and out.quarantine[0].stage == "caption"
    assert sorted({c.image_id for c in out.captions}) == [7, 1000, 1001, 1002]
    for iid in (7, 1000, 1001, 1002):
        rows = [c for c in out.captions if c.image_id == iid]
        assert [c.caption_id for c in rows] == [0, 1, 2, 3]
        assert all(c.captioner == caps[0].name and c.captioner_revision == caps[0].revision for c in rows)
        assert all('"mode": "nucleus"' in c.sampling and '"top_p": 0.9' in c.sampling for c in rows)
    s = out.stats
    assert s["images"] == 5 and s["images_captioned"] == 4 and s["captions"] == 16 and s["quarantined"] == 1
    assert s["top_quarantine_reasons"] == {out.quarantine[0].reason: 1} and s["oom_halvings"] == 0
    assert sum(s["top_n_unique"].values()) == 4
    assert s["unique_captions"] == sum(int(k) * v for k, v in s["top_n_unique"].items())
    to_table(out.captions, Caption)  # fits the explicit schema


class OOMOnce:
    """Wraps a captioner; its first call with more than one image raises torch.cuda.OutOfMemoryError."""

    def __init__(self, inner):
        self.inner, self.calls, self.fired = inner, [], False
        self.name, self.revision, self.needs_pixels = inner.name, inner.revision, inner.needs_pixels

    def sampling(self):
        return self.inner.sampling()

    def caption(self, images, pixels, seed):
        self.calls.append(len(images))
        if not self.fired and len(images) > 1:
            self.fired = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.inner.caption(images, pixels, seed)


def test_cuda_oom_halves_micro_batch_and_captions_are_unchanged(blip_dir, photos):
    root, recs = photos
    cfg = _cfg(blip_dir, batch_size=4)
    (cap,) = build_captioners(cfg, None)
    clean = caption_batch(recs, [cap], root, seed=3, cfg=cfg)
    wrapped = OOMOnce(cap)
    retried = caption_batch(recs, [wrapped], root, seed=3, cfg=cfg)
    assert wrapped.calls == [4, 2, 2, 1]  # 4 fails, then micro-batches of 2 for the 5 images
    assert retried.stats["oom_halvings"] == 1 and retried.stats["micro_batch"] == 2
    assert clean.stats["oom_halvings"] == 0
    assert retried.captions == clean.captions


def _write(rows, path):
    pq.write_table(to_table(rows, Caption), path)


def test_failed_batch_redone_alone_gives_byte_identical_shard(blip_dir, photos, tmp_path):
    """A shard of 3 batches; batch 1 fails once; the rerun redoes only batch 1; files equal a clean run's."""
    root, recs = photos
    cfg = _cfg(blip_dir, batch_size=2)
    (cap,) = build_captioners(cfg, None)
    batches = [recs[0:2], recs[2:4], recs[4:5]]

    class FailOnce:
        def __init__(self, inner):
            self.inner, self.armed = inner, True
            self.name, self.revision, self.needs_pixels = inner.name, inner.revision, inner.needs_pixels

        def sampling(self):
            return self.inner.sampling()

        def caption(self, images, pixels, seed):
            if self.armed and images[0].image_id == recs[2].image_id:
                self.armed = False
                raise RuntimeError("worker lost (injected)")
            return self.inner.caption(images, pixels, seed)

    def run(out_dir, captioner):
        ran = []
        for b, imgs in enumerate(batches):
            path = out_dir / f"batch-{b:05d}.parquet"
            if path.exists():
                continue  # finished batches are skipped on rerun
            try:
                res = caption_batch(imgs, [captioner], root, batch_seed("run-A", 0, b), cfg)
            except RuntimeError:
                continue  # the flow marks the batch failed and goes on with the shard
            _write(res.captions, path)
            ran.append(b)
        return ran

    clean_dir, faulty_dir = tmp_path / "clean", tmp_path / "faulty"
    clean_dir.mkdir()
    faulty_dir.mkdir()
    assert run(clean_dir, cap) == [0, 1, 2]
    flaky = FailOnce(cap)
    assert run(faulty_dir, flaky) == [0, 2]
    assert not (faulty_dir / "batch-00001.parquet").exists()
    assert run(faulty_dir, flaky) == [1]  # redone alone
    for b in range(3):
        name = f"batch-{b:05d}.parquet"
        assert (faulty_dir / name).read_bytes() == (clean_dir / name).read_bytes(), name


def test_blip2_tiny_n_cap_reproducible_and_combined_with_blip(blip_dir, blip2_dir, photos):
    root, recs = photos
    cfg = _cfg(blip_dir, captioner=("blip", "blip2"), blip2_model=blip2_dir, n_cap=3)
    caps = build_captioners(cfg, None)
    assert [type(c) for c in caps] == [BlipCaptioner, Blip2Captioner]
    assert caps[1].name == f"blip2:{blip2_dir}" and caps[1].image_size == 32  # its own processor size
    pix = _pixels(root, recs)
    b2 = caps[1].caption(recs, pix, seed=4)
    assert all(len(c) == 3 for c in b2)
    assert b2 == caps[1].caption(recs, pix, seed=4)
    assert caps[1].caption(recs[1:2], pix[1:2], seed=4) == [b2[1]]
    out = caption_batch(recs, caps, root, seed=4, cfg=cfg)
    rows = [c for c in out.captions if c.image_id == recs[0].image_id]
    assert [c.caption_id for c in rows] == list(range(6))
    assert [c.captioner for c in rows] == [caps[0].name] * 3 + [caps[1].name] * 3
    assert [c.text for c in rows[3:]] == b2[0]
    assert out.stats["top_captions_by_captioner"] == {caps[0].name: 15, caps[1].name: 15}


def test_blip2_beam_when_n_cap_is_1(blip2_dir, photos):
    root, recs = photos
    cap = Blip2Captioner.load(blip2_dir, n_cap=1, num_beams=2, max_length=10, min_length=3)
    pix = _pixels(root, recs[:3])
    a = cap.caption(recs[:3], pix, seed=1)
    assert all(len(c) == 1 for c in a) and a == cap.caption(recs[:3], pix, seed=2)
    assert cap.sampling()["mode"] == "beam"


@pytest.mark.slow
def test_rerun_in_a_fresh_process_writes_the_same_captions(blip_dir, photos):
    """The seed promise across processes: same run key + batch -> same captions (no hidden process state)."""
    import json
    import subprocess
    import sys

    root, recs = photos
    cfg = _cfg(blip_dir)
    seed = batch_seed("run-B", 3, 7)
    here = [c.text for c in caption_batch(recs, build_captioners(cfg, None), root, seed, cfg).captions]
    code = f"""
import json, sys
from storage.records import ImageRecord
from tasks.stages.caption import batch_seed, build_captioners, caption_batch
from tasks.config import CaptionConfig
from tests.tiny_models import SIZE, build_tiny_blip, build_tiny_blip2, draw_images
cfg = CaptionConfig.model_validate_json({cfg.model_dump_json()!r})
recs = [ImageRecord(**r) for r in json.loads({json.dumps([dict(image_id=r.image_id, file_name=r.file_name, width=r.width, height=r.height, shard=0) for r in recs])!r})]
out = caption_batch(recs, build_captioners(cfg, None), {root!r}, batch_seed("run-B", 3, 7), cfg)
print(json.dumps([c.text for c in out.captions]))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == here
    assert seed == batch_seed("run-B", 3, 7)


def test_the_paper_best_row_preset_is_blip_and_blip2_ten_each_and_keys_like_the_list(
    blip_dir, blip2_dir, photos
):
    """`blip+blip2` (paper Table 21, 15.34): 20 nucleus captions per image, 10 by each model, in that order, with
    the captioner that wrote each; the same config and stage keys as spelling the list out."""
    import json

    from tasks.config import PipelineConfig
    from tasks.run.registry import chain

    root, recs = photos
    models = dict(model=blip_dir, blip2_model=blip2_dir, image_size=SIZE, max_length=10, min_length=4)
    preset = CaptionConfig(captioner="blip+blip2", **models)
    assert preset == CaptionConfig(captioner="blip,blip2", n_cap=10, **models)
    assert preset.captioner == ("blip", "blip2") and preset.n_cap == 10
    caps = build_captioners(preset, None)
    out = caption_batch(recs[:2], caps, root, seed=7, cfg=preset)
    for im in recs[:2]:
        rows = [c for c in out.captions if c.image_id == im.image_id]
        assert [c.caption_id for c in rows] == list(range(20))  # before de-duplication
        assert [c.captioner for c in rows] == [f"blip:{blip_dir}"] * 10 + [f"blip2:{blip2_dir}"] * 10
        assert {json.loads(c.sampling)["mode"] for c in rows[:10]} == {"nucleus"}
        assert [c.captioner_revision for c in rows] == [caps[0].revision] * 10 + [caps[1].revision] * 10
    inputs = {"annotations_sha256": "a" * 64, "images_root": "/i"}
    keys = {
        spelling: [
            link.key
            for link in chain(PipelineConfig.model_validate({"caption": {**models, **extra}}), inputs)[1]
        ]
        for spelling, extra in {
            "preset": {"captioner": "blip+blip2"},
            "list": {"captioner": "blip,blip2"},
            "list and n_cap": {"captioner": ["blip", "blip2"], "n_cap": 10},
        }.items()
    }
    assert keys["preset"] == keys["list"] == keys["list and n_cap"]
    other = chain(
        PipelineConfig.model_validate({"caption": {**models, "captioner": "blip,blip2", "n_cap": 5}}), inputs
    )
    assert other[1][1].key != keys["preset"][1]  # the caption stage (after verify)
    with pytest.raises(
        ValueError, match=r"preset 'blip\+blip2' is blip \+ blip2 with 10 captions each, but n_cap is 5"
    ):
        CaptionConfig(captioner="blip+blip2", n_cap=5)
    with pytest.raises(ValueError, match="captioner"):
        CaptionConfig(captioner="blip+oracle")
