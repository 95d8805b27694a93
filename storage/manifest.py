"""Typed manifests: the plan (`plan.json`) and a run's record (`runs/<run_key>.json`) with its chain of keys."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields


def _known(cls, d: dict, what: str) -> dict:
    names = {f.name for f in fields(cls)}
    if not isinstance(d, dict):
        raise ValueError(f"{what} is a {type(d).__name__}, not a JSON object")
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in d and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{what} lacks {missing}; was it written by another reltag version?")
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard of the plan: its index, how many images and batches it holds."""

    shard: int
    images: int
    batches: int

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        return cls(int(d["shard"]), int(d["images"]), int(d["batches"]))


@dataclass(frozen=True)
class PlanManifest:
    """What planning wrote: inputs with checksums, categories, shards, counts. Written last, atomically."""

    plan_key: str
    dataset: str
    created_at: str
    inputs: dict
    categories: list
    shards: list[ShardInfo]
    counts: dict
    quarantined: int
    plan: dict
    versions: dict
    plan_seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> PlanManifest:
        d = _known(cls, d, "plan manifest")
        return cls(**{**d, "shards": [ShardInfo.from_dict(s) for s in d["shards"]]})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    def shard(self, shard: int) -> ShardInfo:
        for s in self.shards:
            if s.shard == shard:
                return s
        raise ValueError(
            f"plan {self.plan_key} has shards 0..{len(self.shards) - 1}; there is no shard {shard}"
        )


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One stage of a run: its key, the upstream key it chains to, the settings and revision it hashes."""

    stage: str
    key: str
    upstream: str
    settings: dict
    revision: str

    @classmethod
    def from_dict(cls, d: dict) -> ChainLink:
        return cls(d["stage"], d["key"], d["upstream"], d.get("settings", {}), d.get("revision", ""))


@dataclass(frozen=True)
class RunRecord:
    """A run: the plan it labels, its chain of stage keys (lineage), the full config, revisions, versions."""

    run_key: str
    dataset: str
    plan_key: str
    created_at: str
    chain: list[ChainLink]
    config: dict
    revisions: dict
    versions: dict
    inputs: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        d = _known(cls, d, "run record")
        return cls(**{**d, "chain": [ChainLink.from_dict(c) for c in d["chain"]]})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def stage_keys(self) -> tuple[tuple[str, str], ...]:
        return tuple((c.stage, c.key) for c in self.chain)
