"""BLIP captioner (paper Sec. 4.2.1) through transformers: each image encoded once, N_Cap captions sampled from it.

Nucleus sampling runs a decoding loop over the BLIP text decoder's own modules that does per image what
`generate(num_return_sequences=N)` does per sequence only once:
  - the ViT encodes each image once;
  - the cross-attention keys/values of the image tokens are projected once per image and layer (generate
    projects them for every one of the N expanded sequences);
  - the prompt is run once per image, and its self-attention cache is then copied to the N sequences;
  - at each step the N queries of one image attend to its keys/values as one [N, S] product (queries of the
    same image folded into the query-length axis), not N separate products against N copies.
Logits processing is transformers' own (repetition penalty, min length, top-k, top-p, in generate's order);
draws use one torch.Generator per image (models.captioners.sampling). N_Cap == 1 uses transformers' beam
search, which is deterministic, with its own repetition penalty (1.0: BLIP's generate hard-codes 1.1 for
nucleus sampling only and passes its `repetition_penalty=1.0` argument to beam search).
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F

from models.captioners.sampling import SeededSampler, generation_processors, image_seed
from models.devices import check_device, torch_dtype


def resolve(model: str, revision: str) -> str:
    """The hub revision pinned to its commit (a str equal to `revision` with `.resolved`), best effort.

    Loading every file at the returned revision keeps one load on one repository state; local directories
    and unresolvable revisions (offline, unknown repo) come back unchanged.
    """
    if os.path.isdir(model):
        return revision
    from transformers.utils.hub import resolve_revision

    return resolve_revision(model, revision) or revision


def model_revision(model: str, revision: str) -> str:
    """What identifies the weights: the hub commit, or for a local directory a sha256 of its files."""
    if os.path.isdir(model):
        h = hashlib.sha256()
        names = sorted(
            n for n in os.listdir(model) if n.endswith((".safetensors", ".json", ".txt", ".model"))
        )
        for n in names:
            h.update(n.encode())
            with open(os.path.join(model, n), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        return "local-sha256:" + h.hexdigest()[:16]
    return getattr(revision, "resolved", None) or str(revision)


_SETTINGS = (
    "name", "revision", "n_cap", "top_p", "top_k", "max_length", "min_length", "repetition_penalty", "num_beams",
    "prompt", "image_size",
)  # fmt: skip


def _settings(scope: dict) -> dict:
    """The generation settings among a captioner constructor's arguments."""
    return {k: scope[k] for k in _SETTINGS}


def set_generation_settings(captioner, model, processor, **settings) -> None:
    """What BLIP and BLIP-2 captioners share: the model in eval mode, its processor, device, dtype, settings."""
    captioner.model = model.eval()
    captioner.processor = processor
    captioner.tokenizer = processor.tokenizer
    p = next(model.parameters())
    captioner.device, captioner.dtype = p.device, p.dtype
    for k, v in settings.items():
        setattr(captioner, k, v)


class BlipCaptioner:
    """BlipForConditionalGeneration captioner (default: Salesforce/blip-image-captioning-large, the paper's).

    Args:
        model: a loaded BlipForConditionalGeneration (eval mode is set here).
        processor: BlipProcessor (BlipImageProcessorPil + tokenizer).
        name, revision: written into every caption row.
        n_cap: captions per image; 1 switches to beam search with num_beams.
        top_p, top_k: nucleus sampling; top_k=50 is what the BLIP reference code got implicitly from
            transformers' generate defaults.
        max_length, min_length: tokens of the whole sequence, prompt tokens included ([DEC] a picture of = 4),
            as in the BLIP reference code (paper: 20 and 5).
        repetition_penalty: nucleus sampling's; 1.1 in the paper (BLIP's generate hard-codes it for sampling).
        beam_repetition_penalty: beam search's (n_cap == 1); 1.0, i.e. none, the default of BLIP's
            generate(repetition_penalty=1.0), which it passes to beam search only.
        prompt: prefix fed to the decoder and removed from the output.
        image_size: square input side (384 for BLIP ViT-L).
    `load(model, revision, image_size=, dtype=, device=, **settings)` reads weights from a hub id or a local
    directory; dtype float32 on CPU, bfloat16/float16 on GPU.
    """

    needs_pixels = True

    def __init__(
        self,
        model,
        processor,
        *,
        name: str,
        revision: str,
        n_cap: int = 10,
        top_p: float = 0.9,
        top_k: int = 50,
        max_length: int = 20,
        min_length: int = 5,
        repetition_penalty: float = 1.1,
        beam_repetition_penalty: float = 1.0,
        num_beams: int = 3,
        prompt: str = "a picture of ",
        image_size: int = 384,
    ):
        """Wraps an already loaded BlipForConditionalGeneration and BlipProcessor; see `load` for paths."""
        if not repetition_penalty > 0 or not beam_repetition_penalty > 0:
            raise ValueError(
                f"repetition penalties must be > 0, got repetition_penalty={repetition_penalty!r} and "
                f"beam_repetition_penalty={beam_repetition_penalty!r}"
            )
        set_generation_settings(
            self, model, processor, **_settings(locals()), beam_repetition_penalty=beam_repetition_penalty
        )
        tc = model.config.text_config
        self.bos, self.eos, self.pad = tc.bos_token_id, tc.sep_token_id, tc.pad_token_id
        # [DEC] + prompt tokens, no [SEP]: what BLIP's generate feeds the decoder (input_ids[:, :-1], [:, 0] = bos).
        self.prompt_ids = [self.bos] + self.tokenizer(prompt, add_special_tokens=False).input_ids
        if len(self.prompt_ids) >= max_length:
            raise ValueError(
                f"prompt {prompt!r} is {len(self.prompt_ids)} tokens with [DEC], "
                f"leaving nothing below max_length {max_length}"
            )

    @classmethod
    def load(
        cls,
        model: str = "Salesforce/blip-image-captioning-large",
        revision: str = "main",
        *,
        image_size: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        **settings,
    ) -> BlipCaptioner:
        """Load from a hub id or a local directory: safetensors only, no remote code.

        image_size None takes the vision encoder's own input size (384 for BLIP ViT-L, the paper's); another
        size than the encoder's position embeddings were trained for is refused.
        """
        from transformers import (
            AutoTokenizer,
            BlipForConditionalGeneration,
            BlipImageProcessorPil,
            BlipProcessor,
        )

        dev = check_device(device, "caption")
        revision = resolve(model, revision)
        try:
            net = BlipForConditionalGeneration.from_pretrained(
                model,
                revision=revision,
                use_safetensors=True,
                trust_remote_code=False,
                dtype=torch_dtype(dtype, "caption"),
            ).to(dev)
            native = int(net.config.vision_config.image_size)
            if image_size is None:
                image_size = native
            elif image_size != native:
                raise ValueError(
                    f"caption image_size {image_size} does not fit the BLIP captioner {model!r}: its vision "
                    f"encoder takes {native}x{native} inputs; set image_size to {native} or leave it unset"
                )
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=False)
            image_processor = BlipImageProcessorPil.from_pretrained(
                model, revision=revision, size={"height": image_size, "width": image_size}
            )
            processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        except OSError as e:
            raise OSError(
                f"cannot load the BLIP captioner {model!r} (revision {str(revision)!r}): a hub id needs the "
                f"network or the local hub cache, a local directory needs safetensors weights, processor and "
                f"tokenizer files; {e}"
            ) from e
        rev = model_revision(model, revision)
        return cls(net, processor, name=f"blip:{model}", revision=rev, image_size=image_size, **settings)

    def sampling(self) -> dict:
        if self.n_cap == 1:
            return {
                "mode": "beam",
                "num_beams": self.num_beams,
                "max_length": self.max_length,
                "min_length": self.min_length,
                "repetition_penalty": self.beam_repetition_penalty,
                "prompt": self.prompt,
                "image_size": self.image_size,
            }
        return {
            "mode": "nucleus",
            "n_cap": self.n_cap,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_length": self.max_length,
            "min_length": self.min_length,
            "repetition_penalty": self.repetition_penalty,
            "prompt": self.prompt,
            "image_size": self.image_size,
            "seeding": "per-image torch.Generator(sha256(batch_seed:image_id))",
        }

    def pixel_values(self, pixels) -> torch.Tensor:
        """PIL images -> Tensor[B, 3, image_size, image_size] on the model's device and dtype."""
        pv = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    @torch.inference_mode()
    def caption(self, images, pixels, seed: int) -> list[list[str]]:
        if not images:
            return []
        if any(p is None for p in pixels):
            raise ValueError(
                "BLIP captioner got an image without pixels; quarantined images must be left out"
            )
        pv = self.pixel_values(pixels)
        if self.n_cap == 1:
            seqs = self.beam(pv)
        else:
            seqs = self.sample(pv, [image_seed(seed, im.image_id) for im in images])
        texts = self.tokenizer.batch_decode(seqs[:, len(self.prompt_ids) :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        n = self.n_cap
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]

    def beam(self, pv: torch.Tensor) -> torch.Tensor:
        """Tensor[B, 3, H, W] -> Tensor[B, L] token ids (prompt included), transformers' beam search."""
        ids = torch.tensor([self.prompt_ids + [self.eos]], device=self.device).repeat(pv.shape[0], 1)
        return self.model.generate(
            pixel_values=pv,
            input_ids=ids,  # BLIP's generate sets ids[:, 0] = bos and drops the trailing [SEP]
            num_beams=self.num_beams,
            do_sample=False,
            max_length=self.max_length,
            min_length=self.min_length,
            repetition_penalty=self.beam_repetition_penalty,
        )

    def sample(self, pv: torch.Tensor, seeds: list[int], *, n: int | None = None) -> torch.Tensor:
        """Nucleus sampling, each image encoded once.

        Args:
            pv: Tensor[B, 3, H, W] pixel values.
            seeds: one per image.
            n: sequences per image (default n_cap).
        Returns:
            Tensor[B*n, L] token ids, image-major, prompt included, padded with [PAD] after [SEP].
        """
        n = n or self.n_cap
        image_embeds = self.model.vision_model(pixel_values=pv)[0]  # [B, S, Dv], S = 1 + (384/16)^2 = 577
        procs = generation_processors(
            repetition_penalty=self.repetition_penalty,
            min_length=self.min_length,
            eos_token_id=self.eos,
            top_k=self.top_k,
            top_p=self.top_p,
            do_sample=True,
        )
        return decode_loop(
            self.model.text_decoder,
            image_embeds,
            self.prompt_ids,
            n,
            procs,
            SeededSampler(seeds, n, self.device),
            max_length=self.max_length,
            eos=self.eos,
            pad=self.pad,
        )


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Tensor[R, T, H*d] -> Tensor[R, H, T, d]."""
    r, t, _ = x.shape
    return x.view(r, t, heads, -1).transpose(1, 2)


def _layer(layer, h, past, cross_kv, n: int, heads: int):
    """One BlipTextLayer on Tensor[R, T, D] (R = B*n, image-major) with a concatenating self-attention cache.

    Returns the new hidden states and the self-attention (keys, values), each Tensor[R, H, T_total, d].
    """
    r, t, dim = h.shape
    sa = layer.attention.self
    q, k, v = _split(sa.query(h), heads), _split(sa.key(h), heads), _split(sa.value(h), heads)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    # Causal only while the whole prompt is processed at once; a single new token sees all of the past.
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and t > 1)
    h = layer.attention.output(ctx.transpose(1, 2).reshape(r, t, dim), h)

    ck, cv = cross_kv  # [B, H, S, d], projected once per image
    b = ck.shape[0]
    ca = layer.crossattention.self
    # The n sequences of image i are rows [i*n, (i+1)*n): fold them into the query axis, [B, H, n*T, d],
    # so one [n*T, S] product per image and head replaces n products against n copies of the keys.
    cq = ca.query(h).view(b, n * t, heads, -1).transpose(1, 2)
    ctx = F.scaled_dot_product_attention(cq, ck, cv)  # [B, H, n*T, d]
    ctx = ctx.transpose(1, 2).reshape(r, t, dim)
    h = layer.crossattention.output(ctx, h)
    return layer.feed_forward_chunk(h), (k, v)


def decode_loop(
    text_decoder,
    image_embeds: torch.Tensor,
    prompt_ids: list[int],
    n: int,
    processors,
    pick,
    *,
    max_length: int,
    eos: int,
    pad: int,
) -> torch.Tensor:
    """Autoregressive decoding of n sequences per image with a BlipTextLMHeadModel.

    Args:
        text_decoder: BlipTextLMHeadModel (its modules are called directly; weights untouched).
        image_embeds: Tensor[B, S, Dv] vision features, one row per image (not expanded).
        prompt_ids: decoder prompt, [DEC] first.
        n: sequences per image.
        processors: LogitsProcessorList applied to Tensor[B*n, V] scores with the sequences so far.
        pick: Tensor[B*n, V] processed scores -> Tensor[B*n] next tokens (a SeededSampler, or argmax).
        max_length: total sequence length including the prompt.
    Returns:
        Tensor[B*n, L] token ids, L <= max_length, image-major, [PAD] after [SEP].
    """
    bert = text_decoder.bert
    layers = bert.encoder.layer
    heads = text_decoder.config.num_attention_heads
    b = image_embeds.shape[0]
    dev = image_embeds.device

    cross = []
    for layer in layers:
        ca = layer.crossattention.self
        cross.append((_split(ca.key(image_embeds), heads), _split(ca.value(image_embeds), heads)))

    # Prompt once per image; its logits and cache are then repeated for the n sequences.
    ids = torch.tensor([prompt_ids], device=dev).expand(b, -1)
    h = bert.embeddings(input_ids=ids, past_key_values_length=0)
    cache = []
    for layer, ckv in zip(layers, cross):
        h, kv = _layer(layer, h, None, ckv, 1, heads)
        cache.append(kv)
    logits = text_decoder.cls(h[:, -1:]).squeeze(1).repeat_interleave(n, dim=0)  # [B*n, V]
    cache = [(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in cache]
    seqs = ids.repeat_interleave(n, dim=0)  # [B*n, P]
    finished = torch.zeros(b * n, dtype=torch.bool, device=dev)
    while seqs.shape[1] < max_length:
        scores = processors(seqs, logits.float())
        nxt = pick(scores)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        finished |= nxt == eos
        if bool(finished.all()) or seqs.shape[1] >= max_length:
            break
        h = bert.embeddings(input_ids=nxt[:, None], past_key_values_length=seqs.shape[1] - 1)
        for i, layer in enumerate(layers):
            h, cache[i] = _layer(layer, h, cache[i], cross[i], n, heads)
        logits = text_decoder.cls(h).squeeze(1)
    return seqs
