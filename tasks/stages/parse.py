"""Parse stage: captions -> (subject, relation, object) texts by SceneGraphParser, duplicates skipped, bad text counted."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from models.scene_graph import SceneGraphParser, get_parser
from storage.records import Caption, ParsedRelation
from tasks.config import ParseConfig, PipelineConfig
from tasks.run.context import RunContext, read_stage
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.run.revisions import package_version
from tasks.stats import Count, Label, Max, Ratio, Stats, Tally


@dataclass(slots=True)
class ParseOutput:
    relations: list[ParsedRelation]
    stats: Stats = field(default_factory=Stats)


# Unicode categories replaced by a space before parsing: controls, format chars, surrogates, private use,
# unassigned. They carry no words, and a lone surrogate cannot even be encoded as UTF-8 for Parquet.
_STRIP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def _is_emoji(ch: str) -> bool:
    o = ord(ch)
    return 0x1F000 <= o <= 0x1FAFF or 0x2600 <= o <= 0x27BF or 0xFE00 <= o <= 0xFE0F


def clean_caption(text: str, max_chars: int) -> tuple[str, list[str]]:
    """The text to parse and the bad-input flags it raised (empty text means nothing to parse).

    Flags: empty, whitespace_only, control_chars (replaced by spaces), emoji, non_english (under half of
    the letters are ASCII), too_long (cut to max_chars). A clean caption comes back unchanged, so its
    graph is exactly sng_parser's.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption text must be str, got {type(text).__name__}")
    flags = []
    if text == "":
        return "", ["empty"]
    if any(unicodedata.category(ch) in _STRIP_CATEGORIES for ch in text if not ch.isspace()):
        flags.append("control_chars")
        text = "".join(
            " " if (unicodedata.category(ch) in _STRIP_CATEGORIES and not ch.isspace()) else ch for ch in text
        )
        text = " ".join(text.split())  # the replaced characters must not leave space runs inside entity spans
    if not text.strip():
        return "", flags + ["whitespace_only"]
    if any(_is_emoji(ch) for ch in text):
        flags.append("emoji")
    letters = [ch for ch in text if ch.isalpha()]
    if letters and sum(ch.isascii() for ch in letters) < 0.5 * len(letters):
        flags.append("non_english")
    if len(text) > max_chars:
        flags.append("too_long")
        text = text[:max_chars]
    return text, flags


def _relations_of(cap: Caption, graph: dict) -> list[ParsedRelation]:
    ents = graph["entities"]
    out = []
    for r in graph["relations"]:
        s, o = ents[r["subject"]], ents[r["object"]]
        out.append(
            ParsedRelation(
                image_id=cap.image_id,
                caption_id=cap.caption_id,
                subject_text=s["span"],
                subject_head=s["head"],
                relation=r["relation"],
                relation_lemma=r["lemma_relation"],
                object_text=o["span"],
                object_head=o["head"],
            )
        )
    return out


def parse_batch(
    captions: list[Caption], cfg: ParseConfig, parser: SceneGraphParser | None = None
) -> ParseOutput:
    """Parse every non-duplicate caption into relation triples, in caption order.

    Args:
        captions: the batch's captions; is_duplicate=True ones are skipped (paper: captions de-duplicated
            per image).
        cfg: the parse settings (spaCy model, processes, max_chars).
        parser: a SceneGraphParser; None takes the process-wide one for cfg.
    """
    if parser is None:
        parser = get_parser(cfg.spacy_model, cfg.processes, cfg.gemm)
    todo: list[tuple[Caption, str]] = []
    bad: dict[str, int] = {}
    n_dup = 0
    for c in captions:
        if c.is_duplicate:
            n_dup += 1
            continue
        text, flags = clean_caption(c.text, cfg.max_chars)
        for f in flags:
            bad[f] = bad.get(f, 0) + 1
        if text:
            todo.append((c, text))
    graphs = parser.parse_many([t for _, t in todo])
    relations: list[ParsedRelation] = []
    n_entities = 0
    n_without = 0
    for (c, _), g in zip(todo, graphs):
        rels = _relations_of(c, g)
        n_entities += len(g["entities"])
        n_without += not rels
        relations.extend(rels)
    n_parsed = len(todo)
    n_considered = len(captions) - n_dup
    stats = Stats(
        captions=Count(len(captions)),
        duplicates_skipped=Count(n_dup),
        captions_parsed=Count(n_parsed),
        captions_not_parsed=Count(n_considered - n_parsed),  # empty / whitespace-only after cleaning
        distinct_texts=Count(len({t for _, t in todo})),  # within the batch
        bad_input=Tally(bad),
        entities=Count(n_entities),
        relations=Count(len(relations)),
        # parse yield: relations per caption that was parsed (duplicates excluded)
        relations_per_caption=Ratio(len(relations), n_parsed),
        captions_without_relations=Count(n_without),
        processes_used=Max(parser.last_used_processes if n_parsed else 0),
        parser=Label.of(parser.versions()),
    )
    return ParseOutput(relations, stats)


# -- the stage ---------------------------------------------------------------------------------------------


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    out = parse_batch(read_stage(ctx, "caption", Caption, shard, batch), ctx.config.parse)
    return StageOutput(out.relations, stats=out.stats)


def parser_revision(cfg: PipelineConfig, inputs: dict) -> str:
    """The parser's identity: SceneGraphParser, spaCy and the spaCy model's package versions."""
    v, model = package_version, cfg.parse.spacy_model
    return (
        f"SceneGraphParser=={v('SceneGraphParser')};spacy=={v('spacy')};{model}=={v(model.replace('_', '-'))}"
    )


STAGE = register(
    Stage(
        "parse", "caption", ParsedRelation, "parses", "parse",
        settings=lambda cfg: cfg.parse.model_dump(mode="json", exclude={"processes"}),
        revision=parser_revision,
        compute=_stage_batch,
        stats=("relations", "captions_not_parsed", "captions_without_relations"),
        funnel=(
            FunnelRow("relations", "relations (parsed)", "relations",
                      lambda s: {"not_parsed": s.count("captions_not_parsed"),
                                 "no_relation": s.count("captions_without_relations")}),
        ),
        revision_record=("parser", parser_revision),
    )
)  # fmt: skip
