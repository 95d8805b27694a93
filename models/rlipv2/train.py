"""Training entry point for RLIPv2-ParSeD: R-Tagger mode with denoising, or learned queries with Hungarian matching.

python -m models.rlipv2.train --data examples/vg_tiny/relationships.json --out /tmp/ckpt --steps 20 --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from models.rlipv2.boxes import xywh_pixels_to_cxcywh
from models.rlipv2.checkpoint import save_checkpoint
from models.rlipv2.config import RLIPv2Config
from models.rlipv2.criterion import Criterion, LossSettings, PairTargets
from models.rlipv2.data import VGImage, load_vg
from models.rlipv2.denoising import flip_labels, noise_boxes, pair_block_mask, region_block_mask
from models.rlipv2.label_sequence import batch_texts, text_frequencies
from models.rlipv2.losses import pair_losses
from models.rlipv2.model import DecoderOutput, EncodedImages, RLIPv2ParSeD
from models.rlipv2.preprocess import preprocess_image
from models.rlipv2.tagger import entity_texts, pad_images
from storage.paths import safe_local_path


def tiny_config(**overrides) -> RLIPv2Config:
    """A small architecture with the reference's structure (4 levels, 6 encoder layers with 3 fusions, 3 + 3
    decoder layers): for tests and the offline example run only; the real constants are RLIPv2Config's defaults."""
    base = dict(
        backbone_depths=(1, 1, 1, 1),
        backbone_widths=(4, 8, 16, 32),
        backbone_stem=8,
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),  # fmt: skip
        d_model=32,
        n_heads=4,
        d_ffn=64,
        gn_groups=8,
        fusion_dim=64,
        fusion_heads=4,
        min_size=64,
        max_size=112,
        max_text_tokens=32,  # the tiny RoBERTa has 40 positions
        dropout=0.0,
    )
    base.update(overrides)
    return RLIPv2Config(**base)


@dataclass
class TrainBatch:
    """One batch, one query group per image. Queries (possibly noised) and their clean targets.

    pixels Tensor[B, 3, H, W], pixel_mask Tensor[B, H, W]; sub/obj_boxes Tensor[B, Q, 4] (queries),
    sub/obj_labels Tensor[B, Q]; valid Tensor[B, Q]; entity_block Tensor[B, 2Q, 2Q]; pair_block Tensor[B, Q, Q];
    tgt_sub/obj_boxes Tensor[B, Q, 4]; tgt_sub/obj_labels Tensor[B, Q]; tgt_rels Tensor[B, Q, Tr].
    """

    pixels: torch.Tensor
    pixel_mask: torch.Tensor
    entity_texts: list[list[str]]
    rel_texts: list[list[str]]
    sub_boxes: torch.Tensor
    obj_boxes: torch.Tensor
    sub_labels: torch.Tensor
    obj_labels: torch.Tensor
    valid: torch.Tensor
    entity_block: torch.Tensor
    pair_block: torch.Tensor
    tgt_sub_boxes: torch.Tensor
    tgt_obj_boxes: torch.Tensor
    tgt_sub_labels: torch.Tensor
    tgt_obj_labels: torch.Tensor
    tgt_rels: torch.Tensor
    n_pairs: list[int]  # distinct annotated pairs per image (before denoising copies)


def make_batch(
    model: RLIPv2ParSeD,
    images: list[VGImage],
    image_root: str | Path | None,
    predicates: list[str],
    generator: torch.Generator | None = None,
    denoise: bool = True,
    shared_texts: bool | None = None,
    frequencies: dict | None = None,
    negative_texts: int = 0,
    sampling: str = "freq",
) -> TrainBatch:
    """Build queries and targets: the annotated pairs of each image, dn_groups noised copies each (Appendix E).

    image_root: the folder the records' file names are relative to (never left: '..', symlinks), or None for
    records whose file names a reader has already resolved and checked (RelationDataset).
    shared_texts: every image gets the same texts, the reference's merge_batch_data (default: on without denoising,
    i.e. pre-training; off in R-Tagger mode, where each image keeps its own labels): the entity texts are
    entity_texts(model, the batch's labels merged first seen first), then `predicates`, each extended to
    label_sequence.split_lengths(negative_texts) with texts sampled from `frequencies` (a
    RelationDataset.class_frequencies() dict) by `sampling` ("freq" / "random") from `generator` (Label Sequence
    Extension, --negative_text_sampling), "no objects" last. No frequencies or negative_texts 0: merged only."""
    cfg = model.cfg
    copies = cfg.dn_groups if denoise else 1
    if shared_texts is None:
        shared_texts = not denoise
    shared = None
    if shared_texts:
        batch_labels = [o.name for im in images for o in im.objects]
        merged = entity_texts(model, batch_labels)[:-1]  # the batch's class texts without "no objects"
        ent_list, predicates = batch_texts(
            [merged], [predicates], frequencies, negative_texts, sampling, generator
        )
        shared = ent_list + [cfg.no_object_text]
    pixels, ents, per_image = [], [], []
    for im in images:
        if image_root is None:
            if not os.path.isabs(im.file_name):
                raise ValueError(
                    f"image {im.image_id}: {im.file_name!r} is not a resolved path (give image_root)"
                )
            path = im.file_name
        else:
            path = safe_local_path(str(image_root), im.file_name)  # never outside image_root ('..', symlinks)
        pixels.append(preprocess_image(Image.open(path), cfg))
        labels = [o.name for o in im.objects]
        ent = list(shared) if shared is not None else entity_texts(model, labels)
        ents.append(ent)
        by_id = {o.object_id: o for o in im.objects}
        pairs = sorted({(r.subject_id, r.object_id) for r in im.relationships})
        if len(pairs) * copies > cfg.n_q:
            raise ValueError(
                f"image {im.image_id}: {len(pairs)} pairs x {copies} denoising copies > n_q {cfg.n_q} query slots"
            )
        rels = torch.zeros(len(pairs), len(predicates))
        for r in im.relationships:
            rels[pairs.index((r.subject_id, r.object_id)), predicates.index(r.predicate)] = 1.0
        box = {
            i: torch.tensor(xywh_pixels_to_cxcywh(o.x, o.y, o.w, o.h, im.width, im.height))
            for i, o in by_id.items()
        }
        per_image.append((pairs, by_id, box, rels, ent))
    q = max(max(len(p[0]) for p in per_image) * copies, 1)
    b = len(images)
    t = {k: torch.zeros(b, q, 4) for k in ("sb", "ob", "tsb", "tob")}
    for k in t:
        t[k][...] = 0.5
    lab = {k: torch.zeros(b, q, dtype=torch.long) for k in ("sl", "ol", "tsl", "tol")}
    sub_ids = torch.full((b, q), -1, dtype=torch.long)
    obj_ids = torch.full((b, q), -1, dtype=torch.long)
    valid = torch.zeros(b, q, dtype=torch.bool)
    tgt_rels = torch.zeros(b, q, len(predicates))
    for i, (pairs, by_id, box, rels, ent) in enumerate(per_image):
        n = len(pairs) * copies
        if n == 0:
            continue
        sp = [s for _ in range(copies) for s, _o in pairs]
        op = [o for _ in range(copies) for _s, o in pairs]
        tsb = torch.stack([box[s] for s in sp])
        tob = torch.stack([box[o] for o in op])
        tsl = torch.tensor([ent.index(by_id[s].name) for s in sp])
        tol = torch.tensor([ent.index(by_id[o].name) for o in op])
        n_cls = len(ent) - 1  # "no objects" is never a flipped label
        if denoise:
            sb, ob = (
                noise_boxes(tsb, cfg.dn_box_noise, generator),
                noise_boxes(tob, cfg.dn_box_noise, generator),
            )
            sl, ol = (
                flip_labels(tsl, n_cls, cfg.dn_label_flip, generator),
                flip_labels(tol, n_cls, cfg.dn_label_flip, generator),
            )
        else:
            sb, ob, sl, ol = tsb, tob, tsl, tol
        t["sb"][i, :n], t["ob"][i, :n], t["tsb"][i, :n], t["tob"][i, :n] = sb, ob, tsb, tob
        lab["sl"][i, :n], lab["ol"][i, :n], lab["tsl"][i, :n], lab["tol"][i, :n] = sl, ol, tsl, tol
        sub_ids[i, :n], obj_ids[i, :n] = torch.tensor(sp), torch.tensor(op)
        valid[i, :n] = True
        tgt_rels[i, :n] = rels.repeat(copies, 1)
    px, pmask = pad_images(pixels)
    return TrainBatch(
        pixels=px,
        pixel_mask=pmask,
        entity_texts=ents,
        rel_texts=[list(predicates) for _ in images],
        sub_boxes=t["sb"],
        obj_boxes=t["ob"],
        sub_labels=lab["sl"],
        obj_labels=lab["ol"],
        valid=valid,
        entity_block=region_block_mask(torch.cat([sub_ids, obj_ids], 1)),
        pair_block=pair_block_mask(sub_ids, obj_ids),
        tgt_sub_boxes=t["tsb"],
        tgt_obj_boxes=t["tob"],
        tgt_sub_labels=lab["tsl"],
        tgt_obj_labels=lab["tol"],
        tgt_rels=tgt_rels,
        n_pairs=[len(p[0]) for p in per_image],
    )


def tagger_loss(model: RLIPv2ParSeD, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """R-Tagger training: each query slot is assigned to its own (clean) pair; no matching is needed."""
    state = model.encode(batch.pixels, batch.pixel_mask, batch.entity_texts, batch.rel_texts)
    img_index = torch.arange(batch.pixels.shape[0])
    out = model.decode(
        state, img_index, batch.sub_boxes, batch.obj_boxes, batch.sub_labels, batch.obj_labels,
        batch.valid, batch.entity_block, batch.pair_block,
    )  # fmt: skip
    v = batch.valid
    rel_valid = (~state.rel_mask)[:, None, :].expand(-1, v.shape[1], -1)[v]
    return pair_losses(
        model.cfg, out.sub_boxes[v], out.obj_boxes[v], out.sub_logits[v], out.obj_logits[v], out.rel_logits[v],
        batch.tgt_sub_boxes[v], batch.tgt_obj_boxes[v], batch.tgt_sub_labels[v], batch.tgt_obj_labels[v],
        batch.tgt_rels[v], rel_valid,
    )  # fmt: skip


def batch_targets(batch: TrainBatch) -> list[PairTargets]:
    """The criterion's targets from a TrainBatch: each image's first n_pairs rows (the distinct annotated pairs)."""
    return [
        PairTargets(
            sub_boxes=batch.tgt_sub_boxes[i, :n],
            obj_boxes=batch.tgt_obj_boxes[i, :n],
            sub_labels=batch.tgt_sub_labels[i, :n],
            obj_labels=batch.tgt_obj_labels[i, :n],
            rels=batch.tgt_rels[i, :n],
        )
        for i, n in enumerate(batch.n_pairs)
    ]


def model_outputs(out: DecoderOutput, state: EncodedImages, img_index: torch.Tensor) -> dict:
    """RLIPv2ParSeD's decoder output as the criterion's output dict (models.rlipv2.criterion.Criterion): the last
    layer's boxes and logits, `aux` (the earlier layers), `entity_pad` / `rel_pad`, and `rel_phrases` (the
    relation texts' features before fusion)."""
    d = {
        "sub_boxes": out.sub_boxes, "obj_boxes": out.obj_boxes, "sub_logits": out.sub_logits,
        "obj_logits": out.obj_logits, "rel_logits": out.rel_logits, "aux": out.aux,
        "entity_pad": state.entity_mask[img_index], "rel_pad": state.rel_mask[img_index],
    }  # fmt: skip
    if state.phrases is not None:
        d["rel_phrases"] = state.phrases[img_index, state.n_entity :]
    return d


def detect_loss(
    model: RLIPv2ParSeD, batch: TrainBatch, settings: LossSettings = LossSettings()
) -> dict[str, torch.Tensor]:
    """Pre-training mode: learned queries, the reference's full pre-training objective (criterion.Criterion:
    Hungarian matching per image and decoder layer, boxes, classes with "no objects", relation quality focal loss
    with quality and pseudo-labels). The batch's texts (make_batch shared_texts / Label Sequence Extension)
    are the data side of the same objective."""
    state = model.encode(batch.pixels, batch.pixel_mask, batch.entity_texts, batch.rel_texts)
    img_index = torch.arange(batch.pixels.shape[0], device=batch.pixels.device)
    out = model.decode(state, img_index, all_layers=settings.aux_loss, lang_aux=settings.lang_aux_loss)
    return Criterion(settings)(model_outputs(out, state, img_index), batch_targets(batch))


def train(
    data: str | Path,
    out: str | Path | None,
    steps: int,
    mode: str = "tagger",
    lr: float = 1e-4,
    seed: int = 0,
    tiny: bool = False,
    batch_size: int = 2,
    fixed_batch: bool = False,
    model: RLIPv2ParSeD | None = None,
    loss: LossSettings = LossSettings(),
) -> tuple[RLIPv2ParSeD, list[dict[str, float]]]:
    """Train for `steps` steps on a VG-style relationships file; save a checkpoint to `out` if given.

    Args:
        mode: "tagger" (box queries + denoising, how the R-Tagger is trained) or "detect" (learned queries +
            Hungarian matching, how the pre-training flow trains RLIPv2-ParSeD).
        tiny: build the tiny architecture with a word-level tokenizer over the data's words (offline runs);
            otherwise the full architecture from the hub ids / local dirs in RLIPv2Config, pretrained parts.
        fixed_batch: reuse the first batch with the same noise every step (tests: the loss must go down).
        loss: the pre-training objective's settings (detect mode; negative texts drawn from the file's names).
    Returns: the model and the per-step loss terms.
    """
    if mode not in ("tagger", "detect"):
        raise ValueError(f"train: mode {mode!r} is not 'tagger' or 'detect'")
    data = Path(data)
    images = load_vg(data)
    if not images:
        raise ValueError(f"train: {data} holds no images")
    names = sorted({o.name for im in images for o in im.objects})
    predicates = sorted({r.predicate for im in images for r in im.relationships})
    torch.manual_seed(seed)
    if model is None:
        if tiny:
            from models.rlipv2.tokenizer import build_word_tokenizer

            cfg = tiny_config(entity_names=names)
            tokenizer = build_word_tokenizer(names + predicates + [cfg.no_object_text])
            model = RLIPv2ParSeD(cfg, tokenizer)
        else:
            from models.rlipv2.tokenizer import load_tokenizer

            cfg = RLIPv2Config(entity_names=names)
            model = RLIPv2ParSeD(cfg, load_tokenizer(cfg.text_model), pretrained=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    freq = text_frequencies(images) if mode == "detect" else None
    history = []
    for step in range(steps):
        if fixed_batch:
            chosen, gen_seed = images[:batch_size], seed
        else:
            start = (step * batch_size) % len(images)
            chosen, gen_seed = (images + images)[start : start + batch_size], seed + step
        gen = torch.Generator().manual_seed(gen_seed)
        batch = make_batch(
            model, chosen, data.parent, predicates, gen, denoise=(mode == "tagger"), frequencies=freq,
            negative_texts=loss.negative_text_sampling, sampling=loss.sampling_strategy,
        )  # fmt: skip
        t0 = time.perf_counter()
        terms = tagger_loss(model, batch) if mode == "tagger" else detect_loss(model, batch, loss)
        opt.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # Deformable DETR's max_norm
        opt.step()
        history.append(
            {k: float(v.detach()) for k, v in terms.items()}
            | {"step": step, "seconds": time.perf_counter() - t0}
        )
    model.eval()
    if out is not None:
        save_checkpoint(model, out)
        (Path(out) / "train_history.json").write_text(json.dumps(history, indent=1))
    return model, history


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="VG-style relationships.json (image paths relative to it)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", choices=["tagger", "detect"], default="tagger")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny architecture + word tokenizer (offline demo)")
    a = ap.parse_args(argv)
    _, hist = train(a.data, a.out, a.steps, a.mode, a.lr, a.seed, a.tiny, a.batch_size)
    print(f"steps {len(hist)}: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}; checkpoint in {a.out}")


if __name__ == "__main__":
    main()
