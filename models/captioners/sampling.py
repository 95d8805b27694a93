"""Reproducible nucleus sampling: one torch.Generator per image, seeded from the batch seed and the image id.

Why per image: the caption stage may split a batch into smaller generate calls (CUDA OOM halving), and an
image's captions must not depend on which other images shared its call. Each image's draws come from its
own generator, so they depend only on (batch seed, image id) and the model's probabilities.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def image_seed(seed: int, image_id: int) -> int:
    """The sampling seed of one image inside a batch: sha256 of (batch seed, image id), 63 bits."""
    blob = f"{int(seed)}:{int(image_id)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & ((1 << 63) - 1)


def generation_processors(
    *,
    repetition_penalty: float,
    min_length: int,
    eos_token_id: int,
    top_k: int,
    top_p: float,
    do_sample: bool,
) -> LogitsProcessorList:
    """transformers' processors in the order `generate` applies them (penalty, min length, top-k, top-p).

    `min_length` counts the whole sequence, prompt included (MinLengthLogitsProcessor looks at
    input_ids.shape[-1]), which is the BLIP reference code's meaning of min_length.
    """
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if min_length > 0:
        procs.append(MinLengthLogitsProcessor(min_length, eos_token_id))
    if do_sample:
        if top_k:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    return procs


class SeededSampler:
    """Draws one token per row; rows are image-major: rows [i*n, (i+1)*n) belong to image i.

    Args:
        seeds: one seed per image (see image_seed).
        n: sequences per image.
        device: where the probabilities live (generators must be on the same device).
    """

    def __init__(self, seeds: list[int], n: int, device: torch.device | str):
        self.n = n
        dev = torch.device(device)
        self.generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Tensor[B*n, V] processed logits -> Tensor[B*n] token ids."""
        rows = scores.shape[0]
        if rows != self.n * len(self.generators):
            raise ValueError(
                f"sampler got {rows} rows for {len(self.generators)} images x {self.n} sequences"
            )
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.empty(rows, dtype=torch.long, device=scores.device)
        for i, g in enumerate(self.generators):
            sl = slice(i * self.n, (i + 1) * self.n)
            out[sl] = torch.multinomial(probs[sl], 1, generator=g).squeeze(1)
        return out


class SeededPickProcessor(LogitsProcessor):
    """Last logits processor for `generate(do_sample=True)`: draws with SeededSampler and leaves only that token.

    generate's own multinomial then picks it with probability 1, so the draw is ours and reproducible.
    """

    def __init__(self, sampler: SeededSampler):
        self.sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tok = self.sampler(scores)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tok[:, None], 0.0)
        return out
