"""The captioner and the R-Tagger on a CUDA device: fp32 / bf16 / fp16 against the CPU in fp32, reproducible
sampling, and the caption stage's OOM halving driven by a real CUDA allocation. Skipped without a GPU
(marker `gpu`); tiny random-weight models, built here (the GPU machine has no pydantic, Prefect or spaCy)."""

from __future__ import annotations

import copy
import importlib
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip(
    "safetensors", reason="safetensors is not installed (BLIP loads safetensors weights only)"
)
pytest.importorskip("tokenizers", reason="tokenizers is not installed (the tagger's word-level tokenizer)")
pytest.importorskip("PIL", reason="pillow is not installed")

from PIL import Image  # noqa: E402

import kernels  # noqa: E402
from models.captioners.blip import BlipCaptioner  # noqa: E402
from models.rlipv2.model import RLIPv2ParSeD  # noqa: E402
from models.rlipv2.tagger import tag_image  # noqa: E402
from models.rlipv2.tokenizer import build_word_tokenizer  # noqa: E402
from models.rlipv2.train import tiny_config  # noqa: E402
from tests.tiny_models import build_tiny_blip, draw_images  # noqa: E402

pytestmark = pytest.mark.gpu

# ||cuda - cpu fp32|| / ||cpu fp32|| of the BLIP decoder's logits (teacher-forced, whole sequence).
# fp32: cuDNN's convolutions (the ViT's patch embedding) run in TF32 by default (~3e-4); bf16 / fp16: every
# weight and activation rounded to 8 / 11 mantissa bits through 2 + 2 tiny layers.
CAPTION_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# max |cuda - cpu fp32| of the tagger's probabilities (p_subject, p_object: top-1 softmax; p_relation:
# sigmoid). fp32: TF32 convolutions in the ResNet and the CUDA deformable-attention kernel; 16-bit: the whole
# model in that dtype (the kernel accumulates in fp32).
TAGGER_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------- captioner


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip(str(tmp_path_factory.mktemp("tiny_blip")))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    recs = draw_images(root, 5)
    return root, recs, [Image.open(os.path.join(root, r.file_name)).convert("RGB") for r in recs]


def load_blip(path: str, dtype: torch.dtype, device: str) -> BlipCaptioner:
    return BlipCaptioner.load(
        path, dtype=DTYPE_NAMES[dtype], device=device, n_cap=4, max_length=14, min_length=8
    )


@pytest.mark.parametrize("dtype", list(CAPTION_TOL), ids=str)
def test_blip_logits_on_cuda_match_cpu_fp32(blip_dir, photos, dtype):
    """The loaded model (hub-style loading, dtype cast, .to(cuda)) computes on the GPU what it computes on the
    CPU in fp32: the decoder's logits over a fixed token sequence, image encoding included."""
    _, _, pils = photos
    cpu = load_blip(blip_dir, torch.float32, "cpu")
    gpu = load_blip(blip_dir, dtype, "cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    pv = cpu.pixel_values(pils)
    ids = torch.tensor(
        [cpu.prompt_ids + cpu.tokenizer("dog riding a horse", add_special_tokens=False).input_ids]
    )
    ids = ids.repeat(len(pils), 1)
    with torch.inference_mode():
        want = cpu.model(pixel_values=pv, input_ids=ids).logits
        got = gpu.model(pixel_values=pv.to("cuda", dtype), input_ids=ids.cuda()).logits
    assert got.dtype == dtype and torch.isfinite(got).all(), f"{dtype}: non-finite logits"
    err = rel_l2(got, want)
    assert err <= CAPTION_TOL[dtype], f"{dtype}: relative L2 error {err:.3g} > {CAPTION_TOL[dtype]}"


def test_blip_greedy_decode_loop_equals_transformers_generate_on_cuda(blip_dir, photos):
    """reltag's own decoding loop (cross-attention K/V once per image, folded queries, SDPA on the GPU)
    gives transformers' greedy tokens on the GPU in fp32."""
    from models.captioners.blip import decode_loop
    from models.captioners.sampling import generation_processors

    _, _, pils = photos
    cap = load_blip(blip_dir, torch.float32, "cuda")
    pv = cap.pixel_values(pils)
    procs = generation_processors(
        repetition_penalty=1.1, min_length=8, eos_token_id=cap.eos, top_k=50, top_p=0.9, do_sample=False
    )
    ids = torch.tensor([cap.prompt_ids + [cap.eos]], device="cuda").repeat(len(pils), 1)
    with torch.inference_mode():
        emb = cap.model.vision_model(pixel_values=pv)[0]
        ours = decode_loop(
            cap.model.text_decoder, emb, cap.prompt_ids, 1, procs, lambda s: s.argmax(-1),
            max_length=14, eos=cap.eos, pad=cap.pad,
        )  # fmt: skip
        ref = cap.model.generate(
            pixel_values=pv,
            input_ids=ids,
            do_sample=False,
            max_length=14,
            min_length=8,
            repetition_penalty=1.1,
        )
    width = max(ours.shape[1], ref.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=cap.pad)  # noqa: E731
    assert torch.equal(pad(ours).cpu(), pad(ref).cpu())


@pytest.fixture
def full_fp32():
    """No TF32 (cuDNN convolutions use it by default): cuDNN may pick other convolution algorithms for
    other batch sizes, and in TF32 they differ in the last TF32 bits, enough to flip a sampled token now
    and then; exact batch-split invariance on the GPU holds in full fp32 only. Restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", list(CAPTION_TOL), ids=str)
def test_blip_sampling_on_cuda_is_reproducible(blip_dir, photos, dtype, full_fp32):
    """Nucleus sampling on the GPU: N_Cap captions per image, identical on a rerun with the same seed (the
    per-image CUDA generators), different with another seed; in fp32 also independent of how the batch is
    split into calls (what the OOM halving relies on)."""
    root, recs, pils = photos
    cap = load_blip(blip_dir, dtype, "cuda")
    first = cap.caption(recs, pils, seed=7)
    assert len(first) == len(recs) and all(len(c) == cap.n_cap for c in first)
    assert all(isinstance(t, str) for c in first for t in c)
    assert cap.caption(recs, pils, seed=7) == first, f"{dtype}: same seed, different captions"
    assert cap.caption(recs, pils, seed=8) != first, f"{dtype}: another seed gave the same captions"
    if dtype == torch.float32:
        split = cap.caption(recs[:2], pils[:2], seed=7) + cap.caption(recs[2:], pils[2:], seed=7)
        assert split == first, "fp32 captions depend on the micro-batch split"


@dataclass
class _Cfg:
    """What caption_batch reads of CaptionConfig (batch_size only)."""

    batch_size: int


@pytest.fixture
def caption_stage(monkeypatch):
    """tasks.stages.caption. Where pydantic is missing (the GPU machine's image) it is imported with tasks.config
    stubbed (caption_batch reads only cfg.batch_size of its config, passed here as _Cfg) and dropped from
    sys.modules again after the test."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tasks.config")
        stub.CaptionConfig = _Cfg
        monkeypatch.setitem(sys.modules, "tasks.config", stub)
        saved = sys.modules.pop("tasks.stages.caption", None)
        yield importlib.import_module("tasks.stages.caption")
        sys.modules.pop("tasks.stages.caption", None)
        if saved is not None:
            sys.modules["tasks.stages.caption"] = saved
        return
    yield importlib.import_module("tasks.stages.caption")


class AllocatingCaptioner:
    """Wraps a CUDA captioner; every call first allocates `per_image` bytes per image on the GPU (a real
    allocation through PyTorch's caching allocator), holds them during the call, then frees them."""

    def __init__(self, inner: BlipCaptioner, per_image: int):
        self.inner, self.per_image, self.calls, self.ooms = inner, per_image, [], 0
        self.name, self.revision, self.needs_pixels = inner.name, inner.revision, inner.needs_pixels

    def sampling(self):
        return self.inner.sampling()

    def caption(self, images, pixels, seed):
        self.calls.append(len(images))
        try:
            block = torch.empty(len(images) * self.per_image, dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError:
            self.ooms += 1
            raise
        try:
            return self.inner.caption(images, pixels, seed)
        finally:
            del block


@pytest.fixture
def memory_cap():
    """cap(n_bytes): limit this process's CUDA memory to what it holds now plus n_bytes; undone after."""

    capped = []

    def cap(n_bytes: int) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        capped.append(min(1.0, (torch.cuda.memory_reserved() + n_bytes) / total))
        torch.cuda.set_per_process_memory_fraction(capped[-1])

    yield cap
    if capped:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_caption_oom_halving_with_a_real_cuda_allocation(
    blip_dir, photos, caption_stage, memory_cap, full_fp32
):
    """A micro-batch whose allocation does not fit raises torch.OutOfMemoryError from the allocator; the
    caption stage halves the micro-batch (4 -> 2), finishes the batch, and writes the captions of a run
    that never ran out of memory."""
    caption = caption_stage
    root, recs, _ = photos
    cap = load_blip(blip_dir, torch.float32, "cuda")
    cfg = _Cfg(batch_size=4)
    clean = caption.caption_batch(recs, [cap], root, seed=3, cfg=cfg)
    assert clean.stats["oom_halvings"] == 0

    per_image = 256 << 20
    # room for 2 images' blocks and the tiny model's activations, not for 4 images' blocks
    memory_cap(2 * per_image + (128 << 20))
    wrapped = AllocatingCaptioner(cap, per_image)
    retried = caption.caption_batch(recs, [wrapped], root, seed=3, cfg=cfg)
    assert wrapped.ooms == 1, f"expected one real OOM, got {wrapped.ooms} (calls {wrapped.calls})"
    assert wrapped.calls == [4, 2, 2, 1]  # 4 fails, then micro-batches of 2 for the 5 images
    assert retried.stats["oom_halvings"] == 1 and retried.stats["micro_batch"] == 2
    assert retried.captions == clean.captions, "captions changed when the micro-batch was halved"


def test_caption_oom_at_one_image_propagates(blip_dir, photos, caption_stage, memory_cap):
    """When even one image does not fit, the real OOM reaches the caller (the flow marks the batch failed)."""
    caption = caption_stage
    root, recs, _ = photos
    cap = load_blip(blip_dir, torch.float32, "cuda")
    per_image = 512 << 20
    memory_cap(per_image // 2)
    wrapped = AllocatingCaptioner(cap, per_image)
    with pytest.raises(torch.OutOfMemoryError):
        caption.caption_batch(recs[:2], [wrapped], root, seed=3, cfg=_Cfg(batch_size=2))
    assert wrapped.calls == [2, 1] and wrapped.ooms == 2


# ----------------------------------------------------------------------------------------------- tagger

LABELS = ["person", "horse", "dog", "table", "cup", "car"]
RELS = ["riding on", "next to", "holding", "near", "behind"]


@pytest.fixture(scope="module")
def tagger_cpu():
    torch.manual_seed(0)
    cfg = tiny_config(entity_names=LABELS)
    tok = build_word_tokenizer(LABELS + RELS + [cfg.no_object_text])
    return RLIPv2ParSeD(cfg, tok).eval()


@pytest.fixture
def msda_backend(monkeypatch):
    """use(device): the deformable-attention backend for a model on `device`: on cuda the CUDA kernel is
    forced (a failed build fails the test, with the reasons) unless $RELTAG_MSDA_BACKEND was set before
    (benchmarks/gpu/run.sh sets it to reference when the build failed); on cpu the default choice."""
    preset = os.environ.get(kernels.BACKEND_ENV)

    def use(device: str) -> None:
        if preset:
            return
        if device == "cuda":
            monkeypatch.setenv(kernels.BACKEND_ENV, "cuda")
        else:
            monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
        kernels.reset_backends()  # the backend is chosen once per device type: choose again under the new env

    return use


def _scene(n_boxes: int, n_pairs: int, seed: int = 0, size=(96, 128)):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(3, *size, generator=g)
    c = torch.rand(n_boxes, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n_boxes, 2, generator=g) * 0.3 + 0.05
    labels = [LABELS[i % len(LABELS)] for i in range(n_boxes)]
    pairs = [(s, o) for s in range(n_boxes) for o in range(n_boxes) if s != o][:n_pairs]
    return px, torch.cat([c, wh], 1), labels, pairs


def _scores(model, scene, **kw):
    px, boxes, labels, pairs = scene
    scores, counters = tag_image(model, px, boxes, labels, pairs, RELS[:3], n_q=8, **kw)
    return scores, counters


def _max_diff(a, b) -> float:
    return max(
        float(abs(x.astype("float64") - y.astype("float64")).max())
        for x, y in ((a.p_subject, b.p_subject), (a.p_object, b.p_object), (a.p_relation, b.p_relation))
    )


@pytest.mark.parametrize("dtype", list(TAGGER_TOL), ids=str)
def test_tagger_on_cuda_matches_cpu_fp32(tagger_cpu, msda_backend, dtype):
    """tag_image on the GPU (model cast to dtype, CUDA deformable-attention kernel) scores the pairs of a
    30-pair, 4-group image like the CPU in fp32, within the dtype's tolerance."""
    scene = _scene(7, 30, seed=1)
    msda_backend("cpu")
    want, _ = _scores(tagger_cpu, scene)
    msda_backend("cuda")
    model = copy.deepcopy(tagger_cpu).to("cuda", dtype)
    got, counters = _scores(model, scene)
    assert counters == {"encoder_passes": 1, "decoder_groups": 4}
    for name in ("p_subject", "p_object", "p_relation"):
        x = getattr(got, name)
        assert x.shape == getattr(want, name).shape and (x == x).all(), f"{dtype}: {name} has NaN"
    diff = _max_diff(got, want)
    assert diff <= TAGGER_TOL[dtype], f"{dtype}: max |cuda - cpu fp32| {diff:.3g} > {TAGGER_TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tagger_reference_style_on_cuda_scores_alike(tagger_cpu, msda_backend, dtype, request):
    """On the GPU the benchmark's baseline (image re-encoded per group, phrases re-encoded) and reltag's path
    (one encoder pass, phrase cache) give the same scores: 1e-4 in full fp32 (TF32 off: the two encode
    batches of 1 and 4 images, for which cuDNN may pick other algorithms), the bf16 tolerance in bf16."""
    if dtype == torch.float32:
        request.getfixturevalue("full_fp32")
    msda_backend("cuda")
    model = copy.deepcopy(tagger_cpu).to("cuda", dtype)
    scene = _scene(7, 30, seed=2)
    ours, c1 = _scores(model, scene)
    ref, c2 = _scores(model, scene, reference_style=True)
    assert c1["encoder_passes"] == 1 and c2["encoder_passes"] == 4
    tol = 1e-4 if dtype == torch.float32 else TAGGER_TOL[dtype]
    diff = _max_diff(ours, ref)
    assert diff <= tol, f"{dtype}: reltag vs reference_style max |diff| {diff:.3g} > {tol}"


@pytest.mark.skipif(
    bool(os.environ.get(kernels.BACKEND_ENV)),
    reason=f"{kernels.BACKEND_ENV}={os.environ.get(kernels.BACKEND_ENV)} was set for this run",
)
def test_tagger_on_cuda_uses_the_cuda_kernel(msda_backend):
    """With the extension built, a model on the GPU runs the CUDA deformable-attention kernel."""
    msda_backend("cuda")
    assert kernels.select_backend("cuda") == "cuda", kernels.backend_reasons("cuda")
