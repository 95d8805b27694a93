"""Pre-training data: this rank's images of the sources (one reader, one sharding rule) and the resumable batch order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from models.rlipv2.data import RelationDataset, VGImage
from models.rlipv2.pretrain_settings import PretrainSettings


class PretrainDataset(torch.utils.data.Dataset):
    """This rank's images of the sources, indexable: finished labelling runs and VG-format files, in any mix, all
    through `models.rlipv2.data.RelationDataset` (storage.relations: the reference loader's rules, eta applied to
    every source that has confidences; rank r takes the contiguous block [r*N//W, (r+1)*N//W) of the N kept
    images in source and file order).

    `frequencies`: RelationDataset.class_frequencies() of the sources (all ranks' images), which the training loop
    samples negative texts from. Training indexes its data (a seeded permutation per epoch, resumable at any step), so this rank's image
    records are read once, streamed, and held in memory: boxes, texts and relations, never pixels (those are
    decoded per batch). For Objects365 on 8 ranks that is ~210k records per rank.
    """

    def __init__(
        self,
        sources: Sequence[str],
        eta: float = 0.2,
        rule: str = "relation_only",
        overlap_filter: bool = False,
        max_relations: int = 100,
        rank: int = 0,
        world_size: int = 1,
    ):
        rd = RelationDataset(
            list(sources), eta=eta, rule=rule, overlap_filter=overlap_filter, max_relations=max_relations,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        # name frequencies over every rank's images, for the negative texts of Label Sequence Extension
        self.frequencies = rd.class_frequencies()
        self.images = list(rd)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> VGImage:
        return self.images[i]


DatasetFactory = Callable[..., torch.utils.data.Dataset]


def open_sources(
    sources: Sequence[str],
    settings: PretrainSettings,
    rank: int = 0,
    world_size: int = 1,
    factory: DatasetFactory | None = None,
) -> torch.utils.data.Dataset:
    """This rank's share of the training data: a Dataset of VGImage records (PretrainDataset by default).

    `factory` is called as factory(sources, eta=, rule=, overlap_filter=, max_relations=, rank=, world_size=)
    (models.rlipv2.data.RelationDataset's signature). Sources: finished labelling runs (the plan folder `reltag run`
    prints, or runs/<run-key>.json) and VG-format relationship files.
    """
    if not sources:
        raise ValueError("pre-training needs at least one source")
    make = factory or PretrainDataset
    return make(
        list(sources),
        eta=settings.eta,
        rule=settings.rule,
        overlap_filter=settings.overlap_filter,
        max_relations=settings.max_relations,
        rank=rank,
        world_size=world_size,
    )


class EpochBatches:
    """Batches of one epoch from `start` on: a permutation of the rank's indices seeded by (seed, epoch), cut
    into `steps` batches of `batch_size` (the rest dropped). Restarting at (epoch, start) yields exactly the
    batches an uninterrupted epoch yields from there: the data position is just (epoch, step in epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int, steps: int):
        self.n, self.bs, self.seed, self.epoch, self.start, self.steps = (
            n,
            batch_size,
            seed,
            epoch,
            start,
            steps,
        )

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.order()
        for b in range(self.start, self.steps):
            yield perm[b * self.bs : (b + 1) * self.bs]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def collate_records(batch: list) -> list:
    """The DataLoader's collate: the records as they are (make_batch builds the tensors)."""
    return batch


def batch_predicates(records: Sequence[VGImage]) -> list[str]:
    """The relation texts of one batch: its images' predicates in first-seen order (each image scores them all)."""
    return list(dict.fromkeys(r.predicate for im in records for r in im.relationships))
