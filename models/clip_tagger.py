"""CLIP relation tagger (RLIPv2 Table 5 baseline): the union box of a pair scored against a relation prompt and
a no-relation prompt.

For a candidate (subject box, object box, relation text) the image is cropped to the smallest rectangle holding
both boxes; CLIP embeds the crop and two prompts,

    positive  "a photo of {subject} {relation} {object}"
    negative  "a photo of {subject} having no relation with {object}"

and p_relation = softmax([100 cos(crop, positive), 100 cos(crop, negative)])[0]. The reference code keeps a
relation when p_relation >= 0.8. These settings are the reference code's (JacobYuan7/RLIPv2,
`datasets/rlipv2_helper/coco_caption_helper.py`, `prepare_CLIP_features` and its caller): the subject and
object are the boxes' class names, the crop has no margin and is cut by PIL from the full image (PIL rounds
the float corners to whole pixels), and the scale is the constant 100 (trained CLIP's exp(logit_scale), which
CLIP training caps at 100), not read from the model. The paper words the negative "not interacting with"; the
code that produced the published numbers used "having no relation with" (its "not interacting" line is
commented out), and that is the default here.

CLIP does not score the subject and object classes: the boxes are ground truth, so callers set p_subject =
p_object = 1.0 and the confidence is p_relation.

No Prefect here; `tasks/stages/tag/clip.py` turns candidates into rows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from PIL import Image

from models.devices import check_device, torch_dtype

#: CLIP ViT-L/14 at 224 px, the reference's `clip.load("ViT-L/14")`, as transformers publishes it.
HUB_ID = "openai/clip-vit-large-patch14"
#: Multiplier of the cosine similarities before the softmax (the reference's `100. * vis_ft @ text_ft.T`).
SCALE = 100.0
#: Union crops per image forward (the reference's img_batch_size); fixed so results never depend on batching.
CROPS_PER_FORWARD = 64
#: Prompts per text forward.
TEXTS_PER_FORWARD = 256


def relation_prompt(subject: str, relation: str, obj: str) -> str:
    """The positive prompt of a (subject class, relation text, object class) triple."""
    return f"a photo of {subject} {relation} {obj}"


def no_relation_prompt(subject: str, obj: str) -> str:
    """The negative prompt the reference code scores every triple against (the paper: "not interacting with")."""
    return f"a photo of {subject} having no relation with {obj}"


def union_box(
    subject: tuple[float, float, float, float], obj: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """Smallest (x0, y0, x1, y1) rectangle holding both (x, y, w, h) boxes, in pixels, no margin."""
    sx, sy, sw, sh = subject
    ox, oy, ow, oh = obj
    return (min(sx, ox), min(sy, oy), max(sx + sw, ox + ow), max(sy + sh, oy + oh))


def crop_union(
    image: Image.Image, subject: tuple[float, float, float, float], obj: tuple[float, float, float, float]
) -> Image.Image | None:
    """The image cut to the pair's union box by PIL (which rounds the corners), or None when the cut is empty
    (a box of zero width or height, or one under half a pixel that rounds away: the reference skips those)."""
    if subject[2] <= 0 or subject[3] <= 0 or obj[2] <= 0 or obj[3] <= 0:
        return None
    crop = image.crop(union_box(subject, obj))
    if crop.size[0] == 0 or crop.size[1] == 0:
        return None
    return crop


@dataclass(frozen=True, slots=True)
class ClipQuery:
    """One (subject box, object box, relation text) to score; boxes (x, y, w, h) in pixels of the image."""

    subject_box: tuple[float, float, float, float]
    object_box: tuple[float, float, float, float]
    subject_label: str
    relation: str
    object_label: str


def _features(out) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding;
    # older versions returned the tensor itself
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipRelationScorer:
    """A loaded CLIP (model, tokenizer, image processor) that scores relation queries on union crops."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        *,
        revision: str,
        device: str = "cpu",
        dtype: str = "float32",
        scale: float = SCALE,
        crops_per_forward: int = CROPS_PER_FORWARD,
    ):
        """Wrap an already loaded CLIPModel, CLIPTokenizer and CLIP image processor (see `load` for paths).

        Args:
            model: transformers CLIPModel (any size).
            tokenizer: CLIPTokenizer of the same model.
            image_processor: CLIPImageProcessorPil (resize shortest side, centre crop, CLIP mean/std).
            revision: what identifies the weights (hub revision or local directory), for provenance.
            device, dtype: where and in which precision the encoders run; cosines and softmax are float32.
            scale: multiplier of the cosines (100, the reference's).
            crops_per_forward: union crops per image forward.
        """
        self.dtype = torch_dtype(dtype, "CLIP tagger")
        if crops_per_forward < 1:
            raise ValueError(f"crops_per_forward {crops_per_forward} < 1")
        self.device = check_device(device, "CLIP tagger")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.revision = revision
        self.scale = float(scale)
        self.crops_per_forward = crops_per_forward
        # CLIP's text encoder has 77 positions; longer prompts (very long class names or relation texts) are cut
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(
        cls, model: str = HUB_ID, revision: str = "main", *, device: str = "cpu", dtype: str = "float32"
    ) -> ClipRelationScorer:
        """Load a CLIP from a hub id or a local directory: safetensors only, no remote code.

        A hub id needs the network or the local hub cache; a directory needs `config.json`, safetensors weights,
        the tokenizer files (`tokenizer.json`, or `vocab.json` + `merges.txt`) and `preprocessor_config.json`
        or `processor_config.json` (what `CLIPProcessor.save_pretrained` writes). The image processor is the PIL
        one, which needs no torchvision.
        """
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        torch_dtype(dtype, "CLIP tagger")
        check_device(device, "CLIP tagger")  # before reading any weights
        if not os.path.isdir(model) and (os.path.isabs(model) or model.startswith((".", "~"))):
            raise ValueError(f"CLIP model directory {model!r} does not exist")
        try:
            net = CLIPModel.from_pretrained(
                model,
                revision=revision,
                use_safetensors=True,
                trust_remote_code=False,
                dtype=torch_dtype(dtype, "CLIP tagger"),
            )
            tokenizer = CLIPTokenizer.from_pretrained(model, revision=revision)
            image_processor = CLIPImageProcessorPil.from_pretrained(model, revision=revision)
        except OSError as e:
            raise OSError(
                f"cannot load the CLIP tagger model {model!r} (revision {revision!r}): a hub id needs the network "
                f"or the local hub cache, a local directory needs config.json, safetensors weights, tokenizer "
                f"and image processor files; {e}"
            ) from e
        rev = f"local:{os.path.abspath(model)}" if os.path.isdir(model) else f"{model}@{revision}"
        return cls(net, tokenizer, image_processor, revision=rev, device=device, dtype=dtype)

    @torch.no_grad()
    def image_features(self, crops: list[Image.Image]) -> tuple[torch.Tensor, int]:
        """Unit-norm image embeddings of the crops, Tensor[N, D] float32 on the CPU, and the number of forwards."""
        feats, forwards = [], 0
        for i in range(0, len(crops), self.crops_per_forward):
            px = self.image_processor(images=crops[i : i + self.crops_per_forward], return_tensors="pt")
            pixel_values = px["pixel_values"].to(device=self.device, dtype=self.dtype)
            feats.append(_features(self.model.get_image_features(pixel_values=pixel_values)).float().cpu())
            forwards += 1
        if not feats:
            return torch.zeros(0, int(self.model.config.projection_dim)), 0
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True), forwards

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings of the prompts, Tensor[T, D] float32 on the CPU."""
        feats = []
        for i in range(0, len(texts), TEXTS_PER_FORWARD):
            enc = self.tokenizer(
                texts[i : i + TEXTS_PER_FORWARD],
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            feats.append(_features(self.model.get_text_features(**enc)).float().cpu())
        if not feats:
            return torch.zeros(0, int(self.model.config.projection_dim))
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    def score(
        self, images: list[Image.Image], queries: list[list[ClipQuery]]
    ) -> tuple[list[list[float]], dict]:
        """p_relation of every query of every image: softmax over [positive, negative] of scale * cosine.

        Each distinct union box of an image is cropped and encoded once, each distinct prompt once; crops of all
        images share the forwards (`crops_per_forward` each). A query whose crop is empty gets NaN (not scored).

        Args:
            images: decoded RGB images.
            queries: per image, the queries on it (boxes in that image's pixels).

        Returns:
            (per image, per query p_relation in [0, 1] or NaN; stats: crops encoded, unscored queries (empty
            crop), distinct prompts, image forwards)
        """
        if len(images) != len(queries):
            raise ValueError(f"score: {len(images)} images but {len(queries)} query lists")
        crops: list[Image.Image] = []
        crop_index: list[list[int | None]] = []  # per image, per query: row of the crop, None when empty
        unscored = 0
        prompts: dict[str, int] = {}
        for image, qs in zip(images, queries):
            # union box -> row of its crop: pairs with the same union box share one crop
            seen: dict[tuple, int | None] = {}
            rows: list[int | None] = []
            for q in qs:
                valid = min(q.subject_box[2], q.subject_box[3], q.object_box[2], q.object_box[3]) > 0
                key = (union_box(q.subject_box, q.object_box), valid)
                if key not in seen:
                    crop = crop_union(image, q.subject_box, q.object_box)
                    seen[key] = None if crop is None else len(crops)
                    if crop is not None:
                        crops.append(crop)
                rows.append(seen[key])
                unscored += seen[key] is None
                for p in (
                    relation_prompt(q.subject_label, q.relation, q.object_label),
                    no_relation_prompt(q.subject_label, q.object_label),
                ):
                    prompts.setdefault(p, len(prompts))
            crop_index.append(rows)
        img_f, forwards = self.image_features(crops)
        txt_f = self.text_features(list(prompts))
        out: list[list[float]] = []
        for qs, rows in zip(queries, crop_index):
            scores = []
            for q, r in zip(qs, rows):
                if r is None:
                    scores.append(math.nan)
                    continue
                pos = prompts[relation_prompt(q.subject_label, q.relation, q.object_label)]
                neg = prompts[no_relation_prompt(q.subject_label, q.object_label)]
                logits = self.scale * (img_f[r] @ txt_f[[pos, neg]].T)  # Tensor[2]
                scores.append(float(logits.softmax(-1)[0]))
            out.append(scores)
        return out, {"crops": len(crops), "unscored": unscored, "texts": len(prompts), "forwards": forwards}
