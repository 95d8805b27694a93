"""Pre-training step speed: RLIPv2-ParSeDA (the paper's main model, candidate) vs RLIPv2-ParSeD (baseline).

One training step exactly as models/rlipv2/pretrain.py takes it: make_batch from records (JPEG decode, DETR
resize, the batch's texts shared and extended to 500 with frequency-sampled negatives, Label Sequence
Extension), the reference's full objective (criterion.Criterion with LossSettings' defaults: every decoder layer,
quality and pseudo relation labels), backward, gradient clipping at 0.1, AdamW over the reference's three groups.
Full size, random weights, CPU: ResNet-50; RoBERTa-base's shape (hidden 768, 12 layers; vocabulary trimmed to a
word-level tokenizer over the benchmark's words: nothing is downloaded); d 256, 8 heads, 4 points, 6 encoder
layers with 3 fusions, 3 + 3 decoder layers, 200 queries. ParSeD with FFN 1024 (its script), ParSeDA with FFN
2048, DAB decoders, the VXAc gate and the MBF relation queries (its script).

Synthetic Objects365-like data: 1066x800 JPEGs (DETR resize keeps 800x1066, as the reference pre-trains on COCO-
sized images), 12 boxes and 10 relations per image over 365 class names and 180 relation texts; each step's texts
are extended to 333 entity + 167 relation texts (+ "no objects") from the names' frequencies. Both models see
the same batches; steps alternate ParSeD, ParSeDA after a warm-up step each, so load from other processes hits
both alike. Peak RSS is the process's (both models and their optimizer states are resident), sampled during each
step; `step_rss_delta_mib` is the peak during a step above the RSS just before it (activations, gradients).

    python benchmarks/bench_pretrain.py            # full: 800x1066, batch 1, 1 warm-up + 3 timed steps per model
    python benchmarks/bench_pretrain.py --quick    # 400x533, 1 warm-up + 2 timed steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakRSS, add_device_args, check_device, machine, result_path  # noqa: E402
from benchmarks.synth import RELATION_TEXTS, class_phrases  # noqa: E402
from models.rlipv2.checkpoint import model_kind  # noqa: E402
from models.rlipv2.config import ParSeDAConfig, RLIPv2Config  # noqa: E402
from models.rlipv2.criterion import LossSettings  # noqa: E402
from models.rlipv2.data import VGImage, VGObject, VGRelation  # noqa: E402
from models.rlipv2.label_sequence import text_frequencies  # noqa: E402
from models.rlipv2.model import RLIPv2ParSeD  # noqa: E402
from models.rlipv2.parseda import RLIPv2ParSeDA  # noqa: E402
from models.rlipv2.pretrain import DetectionObjective, param_groups  # noqa: E402
from models.rlipv2.pretrain_data import batch_predicates  # noqa: E402
from models.rlipv2.pretrain_settings import PretrainSettings  # noqa: E402
from models.rlipv2.tokenizer import build_word_tokenizer  # noqa: E402
from models.rlipv2.train import make_batch  # noqa: E402

VERB = RELATION_TEXTS
ADV = ["", "partly", "slowly", "quickly", "almost", "barely", "always", "still", "often", "never", "nearly",
       "just"]  # fmt: skip


def vocabulary() -> tuple[list[str], list[str]]:
    """365 class names of one or two words (Objects365 has 365), 180 relation texts of one to three words (more
    than the 167 relation texts a step is extended to)."""
    names = class_phrases()[:365]
    rels = [f"{a} {v}".strip() for a in ADV for v in VERB][:180]
    return names, rels


def synthetic_records(n: int, hw: tuple[int, int], seed: int = 0) -> list[VGImage]:
    """n pre-training records of size hw (H, W) with 12 boxes and 10 relations each (no image files)."""
    names, rels = vocabulary()
    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for i in range(n):
        objects = []
        for j in range(12):
            bw, bh = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            objects.append(VGObject(j + 1, names[int(rng.integers(len(names)))], float(x), float(y), float(bw),
                                    float(bh)))  # fmt: skip
        pairs = set()
        while len(pairs) < 10:
            s, o = rng.choice(12, 2, replace=False)
            pairs.add((int(s) + 1, int(o) + 1))
        relations = [VGRelation(s, o, rels[int(rng.integers(len(rels)))]) for s, o in sorted(pairs)]
        out.append(
            VGImage(image_id=i, file_name="", width=w, height=h, objects=objects, relationships=relations)
        )
    return out


def write_images(records: list[VGImage], folder: Path, seed: int = 0) -> None:
    """A JPEG per record (smooth colour fields plus noise: decodable, not constant); sets its file_name."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, im in enumerate(records):
        yy, xx = np.mgrid[0 : im.height, 0 : im.width]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, ((xx + yy) // 2) % 256], -1)
        px = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        im.file_name = str(folder / f"img{i:03d}.jpg")
        Image.fromarray(px).save(im.file_name, quality=90)


def build(kind: str, tok, text_config: dict, seed: int = 0):
    """A full-size model with random weights (no pretrained parts)."""
    torch.manual_seed(seed)
    if kind == "parsed":
        return RLIPv2ParSeD(RLIPv2Config(text_config=text_config, entity_names=[], n_q=100), tok)
    return RLIPv2ParSeDA(ParSeDAConfig(text_config=text_config, entity_names=[], n_q=100), tok)


class Trainer:
    """One model, its optimizer and objective: step(records) is one pre-training step of pretrain.py's loop."""

    def __init__(self, model, freq: dict, loss: LossSettings):
        self.model = model.train()
        self.settings = PretrainSettings(model=model_kind(model))
        self.opt = torch.optim.AdamW(param_groups(model, self.settings), lr=1.41e-4, weight_decay=1e-4)
        self.objective = DetectionObjective(model, loss)
        self.freq, self.loss = freq, loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.texts: tuple[int, int] = (0, 0)

    def step(self, records) -> float:
        batch = make_batch(
            self.model, records, None, batch_predicates(records), denoise=False, frequencies=self.freq,
            negative_texts=self.loss.negative_text_sampling, sampling=self.loss.sampling_strategy,
        )  # fmt: skip
        self.texts = (len(batch.entity_texts[0]), len(batch.rel_texts[0]))
        terms = self.objective(batch)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 0.1)
        self.opt.step()
        return float(terms["loss"].detach())


def timed_step(trainer: Trainer, records) -> dict:
    import psutil

    before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as m:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = trainer.step(records)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": m.peak_mib, "rss_delta_mib": m.peak_mib - before,
            "loss": loss}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="400x533 images, 2 timed steps (a few minutes)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default 3, quick 2)")
    ap.add_argument("--batch-size", type=int, default=1, help="images per step (default 1)")
    add_device_args(ap)
    a = ap.parse_args()
    check_device(ap, a.device)
    if a.device != "cpu":
        ap.error("bench_pretrain measures the CPU step; --device cuda is not implemented")
    hw = (400, 533) if a.quick else (800, 1066)
    steps = a.steps or (2 if a.quick else 3)
    names, rels = vocabulary()
    from transformers import RobertaConfig

    rb = RobertaConfig()  # RoBERTa-base's shape; vocabulary trimmed to the word-level tokenizer
    tok = build_word_tokenizer(names + rels + ["no objects"])
    text_config = {
        "vocab_size": len(tok), "hidden_size": rb.hidden_size, "num_hidden_layers": rb.num_hidden_layers,
        "num_attention_heads": rb.num_attention_heads, "intermediate_size": rb.intermediate_size,
        "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    }  # fmt: skip
    loss = LossSettings()
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        n_batches = steps + 1
        # the data's name frequencies over 2000 records (every name of the vocabulary occurs): the negatives of
        # Label Sequence Extension fill each step to 333 entity + 167 relation texts, as on the real datasets
        records = synthetic_records(2000, hw)
        freq = text_frequencies(records)
        images = records[: n_batches * a.batch_size]
        write_images(images, Path(tmp))
        # the DETR resize: shorter side 800 (min_size), longer at most 1333; quick scales min/max down alike
        trainers = {}
        for kind in ("parsed", "parseda"):
            model = build(kind, tok, text_config)
            if a.quick:
                model.cfg.min_size, model.cfg.max_size = hw[0], 1333 * hw[0] // 800
            trainers[kind] = Trainer(model, freq, loss)
        params = {k: sum(p.numel() for p in t.model.parameters()) for k, t in trainers.items()}
        batches = [images[i * a.batch_size : (i + 1) * a.batch_size] for i in range(n_batches)]
        runs: dict[str, list[dict]] = {"parsed": [], "parseda": []}
        for i, records in enumerate(batches):  # batch 0 is the warm-up of each model
            for kind, tr in trainers.items():
                r = timed_step(tr, records)
                r["warmup"] = i == 0
                runs[kind].append(r)
                print(f"step {i} {kind}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                      f"loss {r['loss']:.3f}", flush=True)  # fmt: skip
        texts = {k: t.texts for k, t in trainers.items()}
    res = {}
    for kind, rs in runs.items():
        timed = [r for r in rs if not r["warmup"]]
        med = statistics.median(r["wall_s"] for r in timed)
        res[kind] = {
            "seconds": [r["wall_s"] for r in timed],
            "warmup_s": rs[0]["wall_s"],
            "median_s": med,
            "steps_per_s": 1 / med,
            "images_per_s": a.batch_size / med,
            "cpu_seconds_median": statistics.median(r["cpu_s"] for r in timed),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "step_rss_delta_mib": max(r["rss_delta_mib"] for r in timed),
            "losses": [r["loss"] for r in rs],
            "parameters": params[kind],
            "texts_per_image": {"entity": texts[kind][0], "relation": texts[kind][1]},
        }
    speedup = res["parseda"]["steps_per_s"] / res["parsed"]["steps_per_s"]
    out = {
        "name": "pretrain",
        "mode": "quick" if a.quick else "full",
        "input_hw": list(hw),
        "batch_size": a.batch_size,
        "steps": steps,
        "speedup": speedup,
        "speedup_definition": "steps/s of RLIPv2-ParSeDA / steps/s of RLIPv2-ParSeD (median of the timed steps "
        "after one warm-up each, interleaved); < 1: a ParSeDA step is slower",
        "baseline": {"name": "RLIPv2-ParSeD (the reference's other model; FFN 1024)", "median_s": res["parsed"]["median_s"],
                     "steps_per_s": res["parsed"]["steps_per_s"], "peak_rss_mib": res["parsed"]["peak_rss_mib"]},
        "candidate": {"name": "RLIPv2-ParSeDA (DAB decoders, VXAc fusion gate, MBF relation queries; FFN 2048)",
                      "median_s": res["parseda"]["median_s"], "steps_per_s": res["parseda"]["steps_per_s"],
                      "peak_rss_mib": res["parseda"]["peak_rss_mib"]},
        "results": res,
        "objective": "models.rlipv2.criterion.Criterion, LossSettings defaults (aux layers, quality + pseudo "
        "relation labels, 500 texts with negatives)",
        "machine": machine(),
    }  # fmt: skip
    path = Path(result_path(a.results_dir, "pretrain", a.device))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {path}")
    print(
        f"pretrain: {speedup:.2f}x steps/s ParSeDA vs ParSeD ({res['parseda']['median_s']:.2f} vs "
        f"{res['parsed']['median_s']:.2f} s per step of {a.batch_size} {hw[0]}x{hw[1]} image(s); peak RSS "
        f"{res['parseda']['peak_rss_mib']:.0f} MiB, step +{res['parseda']['step_rss_delta_mib']:.0f} vs "
        f"+{res['parsed']['step_rss_delta_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
