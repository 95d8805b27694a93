"""The command line's config flags, read from the config models: each field that declares `cli(...)` is one
flag, with its choices, its type and its default in the help, so `--help` never drifts from what the config
accepts (and a stage's registered section brings its own flags)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from tasks.config import section_models


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field (declared on the field: json_schema_extra=cli(...))."""

    flag: str  # without the leading --, e.g. "shard-size"
    section: str | None  # None: a top-level field (dataset)
    field: str
    type: type  # what argparse converts the value with
    metavar: str | None  # the choices, e.g. "{o365,coco}"
    help: str  # what it sets, what it does, its default

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")


def flags() -> list[Flag]:
    """Every config field's flag, section by section in config order: read from the models, so the command
    line and its `--help` never drift from what the config accepts (and a stage's registered section brings
    its own flags)."""
    out = []
    for section, model in section_models().items():
        for name, f in model.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            if "cli" in extra:
                out.append(_flag(section, name, f, extra))
    return out


def _flag(section: str | None, name: str, f, extra: dict) -> Flag:
    choices: list[str] = []
    ann = f.annotation
    # Literal[...], or a union of Literal[...] and tuple[Literal[...], ...] (caption.captioner)
    alternatives = [ann] if typing.get_origin(ann) is Literal else list(typing.get_args(ann))
    for a in alternatives:
        if typing.get_origin(a) is tuple:
            a = typing.get_args(a)[0]
        if typing.get_origin(a) is Literal:
            choices += [str(c) for c in typing.get_args(a) if str(c) not in choices]
    if ann is bool:
        choices = ["true", "false"]
    types = [a for a in ([ann] if not typing.get_args(ann) else typing.get_args(ann)) if a in (int, float)]
    where = f"{section}.{name}" if section else name
    text = f"{where}: {f.description}" if f.description else where
    default = extra.get("default") or ("none" if f.default is None else str(f.default))
    return Flag(
        flag=extra["cli"], section=section, field=name, type=types[0] if types else str,
        metavar="{" + ",".join(choices) + "}" if choices else None,
        help=f"{text} (default: {default})".replace("%", "%%"),
    )  # fmt: skip
