"""BLIP-2 captioner through transformers (Blip2ForConditionalGeneration): the second captioner of Table 21.

Each image is encoded once (ViT + Q-Former) and its N_Cap captions come from one `generate` call with
`num_return_sequences`; draws are made by a per-image seeded sampler (models.captioners.sampling) as the
last logits processor, so an image's captions do not depend on which images shared the call.
Lengths keep BLIP's meaning: max_length and min_length count the prompt tokens ([BOS] + prompt), not the
32 query-token slots that stand for the image.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from models.captioners.blip import _settings, model_revision, resolve, set_generation_settings
from models.captioners.sampling import SeededPickProcessor, SeededSampler, image_seed
from models.devices import check_device, torch_dtype


class Blip2Captioner:
    """Blip2ForConditionalGeneration captioner (default Salesforce/blip2-opt-2.7b); same settings as BLIP."""

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
        num_beams: int = 3,
        prompt: str = "a picture of ",
        image_size: int = 224,
    ):
        set_generation_settings(self, model, processor, **_settings(locals()))
        cfg = model.config
        bos = cfg.text_config.bos_token_id
        text_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
        self.prompt_ids = [bos] + text_ids  # counted by max_length / min_length
        # The language model reads num_query_tokens image-token slots (filled with Q-Former outputs) first.
        image_token = getattr(cfg, "image_token_id", None)
        image_token = cfg.image_token_index if image_token is None else image_token
        self.input_ids = [image_token] * cfg.num_query_tokens + self.prompt_ids
        if len(self.prompt_ids) >= max_length:
            raise ValueError(
                f"BLIP-2 prompt {prompt!r} is {len(self.prompt_ids)} tokens with [BOS], "
                f"leaving nothing below max_length {max_length}"
            )

    @classmethod
    def load(
        cls,
        model: str = "Salesforce/blip2-opt-2.7b",
        revision: str = "main",
        *,
        image_size: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        **settings,
    ) -> Blip2Captioner:
        """Load from a hub id or a local directory: safetensors only, no remote code."""
        from transformers import (
            AutoTokenizer,
            Blip2ForConditionalGeneration,
            Blip2Processor,
            BlipImageProcessorPil,
        )

        dev = check_device(device, "caption")
        revision = resolve(model, revision)
        try:
            net = Blip2ForConditionalGeneration.from_pretrained(
                model,
                revision=revision,
                use_safetensors=True,
                trust_remote_code=False,
                dtype=torch_dtype(dtype, "caption"),
            ).to(dev)
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=False)
            # BLIP-2's ViT-g has its own input size (224); None keeps the one in the model's processor config.
            size = {} if image_size is None else {"size": {"height": image_size, "width": image_size}}
            image_processor = BlipImageProcessorPil.from_pretrained(model, revision=revision, **size)
            image_size = image_size or image_processor.size["height"]
            processor = Blip2Processor(
                image_processor=image_processor,
                tokenizer=tokenizer,
                num_query_tokens=net.config.num_query_tokens,
            )
        except OSError as e:
            raise OSError(
                f"cannot load the BLIP-2 captioner {model!r} (revision {str(revision)!r}): a hub id needs the "
                f"network or the local hub cache, a local directory needs safetensors weights, processor and "
                f"tokenizer files; {e}"
            ) from e
        rev = model_revision(model, revision)
        return cls(net, processor, name=f"blip2:{model}", revision=rev, image_size=image_size, **settings)

    def sampling(self) -> dict:
        d = {
            "max_length": self.max_length,
            "min_length": self.min_length,
            "repetition_penalty": self.repetition_penalty,
            "prompt": self.prompt,
            "image_size": self.image_size,
        }
        if self.n_cap == 1:
            return {"mode": "beam", "num_beams": self.num_beams, **d}
        return {
            "mode": "nucleus",
            "n_cap": self.n_cap,
            "top_p": self.top_p,
            "top_k": self.top_k,
            **d,
            "seeding": "per-image torch.Generator(sha256(batch_seed:image_id))",
        }

    @torch.inference_mode()
    def caption(self, images, pixels, seed: int) -> list[list[str]]:
        if not images:
            return []
        if any(p is None for p in pixels):
            raise ValueError(
                "BLIP-2 captioner got an image without pixels; quarantined images must be left out"
            )
        b = len(images)
        pv = self.processor.image_processor(images=list(pixels), return_tensors="pt")["pixel_values"]
        pv = pv.to(self.device, self.dtype)
        ids = torch.tensor([self.input_ids], device=self.device).repeat(b, 1)
        p = len(self.prompt_ids)
        common = dict(
            pixel_values=pv,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_length - p,
            min_new_tokens=max(0, self.min_length - p),
            repetition_penalty=self.repetition_penalty,
        )
        if self.n_cap == 1:
            out = self.model.generate(**common, num_beams=self.num_beams, do_sample=False)
        else:
            sampler = SeededSampler([image_seed(seed, im.image_id) for im in images], self.n_cap, self.device)
            out = self.model.generate(
                **common,
                do_sample=True,
                top_p=self.top_p,
                top_k=self.top_k,
                num_return_sequences=self.n_cap,
                logits_processor=LogitsProcessorList([SeededPickProcessor(sampler)]),
            )
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        n = self.n_cap
        return [texts[i * n : (i + 1) * n] for i in range(b)]
