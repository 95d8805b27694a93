"""Caption entity -> annotated class: whole-word, lemma-aware, longest-match vocabulary, plus the reference matcher."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Literal

RULE_RANK = {"name": 0, "synonym": 1, "extension": 2, "lemma": 3}

#: Partitive and collective heads (correct mode): in "a group of sheep" the entity is the noun after "of".
#: A head listed here, with an "of" complement in the same caption, is matched by its complement; without one
#: it is matched as itself. Containers ("a cup of coffee", "a plate of food", "a box of donuts") are NOT
#: here: the container is the object in the picture. Kinds, for the stats and the docs:
PARTITIVES: dict[str, str] = {
    **dict.fromkeys(
        (
            "group",
            "bunch",
            "couple",
            "pair",
            "herd",
            "flock",
            "pack",
            "team",
            "crowd",
            "fleet",
            "swarm",
            "school",
            "troop",
            "family",
            "litter",
            "cluster",
            "collection",
            "set",
            "bundle",
            "assortment",
            "variety",
            "selection",
            "array",
            "number",
            "lot",
            "lots",
            "dozen",
            "handful",
            "bevy",
            "gaggle",
            "brood",
            "pod",
            "colony",
            "gang",
            "band",
            "party",
            "line",
            "row",
            "column",
            "stack",
            "pile",
            "heap",
            "mound",
            "display",
            "arrangement",
            "series",
            "bouquet",
        ),
        "collective",
    ),
    **dict.fromkeys(
        (
            "one",
            "two",
            "three",
            "four",
            "five",
            "several",
            "some",
            "both",
            "each",
            "all",
            "many",
            "few",
            "most",
            "none",
            "any",
            "rest",
        ),
        "quantity",
    ),  # "two of the dogs"
    **dict.fromkeys(
        (
            "slice",
            "piece",
            "half",
            "chunk",
            "bit",
            "portion",
            "serving",
            "helping",
            "bite",
            "wedge",
            "sliver",
            "scoop",
            "segment",
            "part",
        ),
        "portion",
    ),  # "a slice of pizza"
    # "some kind of bird"; not "model" ("a model of a space shuttle" is no shuttle)
    **dict.fromkeys(("kind", "type", "sort", "breed"), "kind"),
    # "the back of a truck": the part is inside the whole's box
    **dict.fromkeys(
        (
            "top",
            "side",
            "front",
            "back",
            "edge",
            "middle",
            "corner",
            "end",
            "bottom",
            "rear",
            "center",
            "centre",
            "surface",
        ),
        "region",
    ),
}

# Irregular plurals seen in captions; regular ones are handled by suffix rules checked against the vocabulary.
IRREGULAR = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "persons": "person",
    "children": "child",
    "mice": "mouse",
    "knives": "knife",
    "shelves": "shelf",
    "leaves": "leaf",
    "wolves": "wolf",
    "halves": "half",
    "loaves": "loaf",
    "scarves": "scarf",
    "wives": "wife",
    "calves": "calf",
    "lives": "life",
    "thieves": "thief",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "oxen": "ox",
    "dice": "die",
    "policemen": "policeman",
    "policewomen": "policewoman",
    "firemen": "fireman",
    "fishermen": "fisherman",
    "postmen": "postman",
    "businessmen": "businessman",
    "gentlemen": "gentleman",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "buses": "bus",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "mangoes": "mango",
    "heroes": "hero",
    "cacti": "cactus",
}

_WORD = re.compile(r"[a-z0-9]+")
#: The body parts that the reference lists give the person class ("hand", "head", "hair", ...). Owned by another
#: thing ("the cow's head") they name that thing, not a person (correct mode).
BODY_PARTS = frozenset(("hand", "limb", "leg", "head", "hair", "foot", "eye", "wrist", "fist", "waist"))
# "'s" / "s'" followed by a space: the possessor ends where it starts
_POSSESSIVE = re.compile(r"(?:['’]s|(?<=s)['’])(?=\s)")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: "A man's T-shirt" -> [a, man, s, t, shirt]."""
    return _WORD.findall(text.lower())


def _norm(name: str) -> str:
    return " ".join(name.split()).lower()


def _split_names(name: str) -> list[str]:
    """Objects365 joins alternatives with "/": "Cabinet/shelf" -> ["cabinet", "shelf"]."""
    return [n for n in (" ".join(p.lower().split()) for p in name.split("/")) if n]


def _read_json(name: str):
    return json.loads(resources.files("models.data.synonyms").joinpath(name).read_text(encoding="utf-8"))


@cache
def _o365_v1() -> dict:
    """Objects365 v1's categories and the v2 list each v1 name takes (o365_v1.json, see SOURCES.md)."""
    return _read_json("o365_v1.json")


def _o365_v1_to_v2() -> dict[str, str | None]:
    return {name: m["v2"] for name, m in _o365_v1()["to_v2"].items()}


#: reltag's synonym extensions, kept apart from the reference lists (see SOURCES.md): every added phrase with
#: the list key of the class it maps to and why.
EXTENSION_FILES = {"coco": "coco_extensions.json", "o365": "o365_extensions.json"}


@dataclass(slots=True, frozen=True)
class Extension:
    """One added phrase: the paraphrase-list key of its class and the reason it names that class."""

    phrase: str
    key: str
    why: str
    not_with_of: bool = False  # not for an entity with an "of" complement ("a pitcher of water" is a jug)
    not_after: tuple[str, ...] = ()  # not right after these words ("its mother" is an animal's)


@cache
def extensions(synonyms: str) -> tuple[Extension, ...]:
    """The extension file of a vocabulary, validated: every entry names a listed class, says why, and adds a
    phrase that the class's own names and reference synonyms do not already have."""
    if synonyms not in EXTENSION_FILES:
        raise ValueError(f"synonyms must be one of {sorted(EXTENSION_FILES)}, got {synonyms!r}")
    name = EXTENSION_FILES[synonyms]
    data = _read_json(name)
    para = _read_json("o365_obj_paraphrase.json" if synonyms == "o365" else "coco_obj_paraphrase.json")
    if data.get("vocabulary") != synonyms or not isinstance(data.get("entries"), list):
        raise ValueError(f"{name}: needs 'vocabulary': {synonyms!r} and an 'entries' list")
    out, seen = [], set()
    for i, e in enumerate(data["entries"]):
        phrase, key, why = (e.get(k) if isinstance(e, dict) else None for k in ("phrase", "class", "why"))
        where = f"{name} entry {i} ({phrase!r} -> {key!r})"
        if not isinstance(phrase, str) or " ".join(words(phrase)) != phrase:
            raise ValueError(f"{where}: the phrase must be lower-case words separated by single spaces")
        if key not in para:
            raise ValueError(f"{where}: {key!r} is not a class key of the {synonyms} synonym lists")
        if not isinstance(why, str) or not why.strip():
            raise ValueError(f"{where}: says no 'why'")
        listed = {" ".join(words(p)) for p in para[key]} | {" ".join(words(n)) for n in _split_names(key)}
        if phrase in listed:
            raise ValueError(f"{where}: the reference list of {key!r} already has {phrase!r}")
        if (phrase, key) in seen:
            raise ValueError(f"{where}: listed twice")
        seen.add((phrase, key))
        flag = e.get("not_with_of", False)
        if not isinstance(flag, bool):
            raise ValueError(f"{where}: 'not_with_of' must be true or false, got {flag!r}")
        after = e.get("not_after", [])
        if not isinstance(after, list) or not all(isinstance(w, str) and words(w) == [w] for w in after):
            raise ValueError(f"{where}: 'not_after' must be a list of lower-case words, got {after!r}")
        out.append(Extension(phrase, key, why, flag, tuple(after)))
    return tuple(out)


def extension_phrases(synonyms: str) -> dict[str, tuple[str, ...]]:
    """Paraphrase-list key -> its extension phrases, in file order."""
    out: dict[str, list[str]] = {}
    for e in extensions(synonyms):
        out.setdefault(e.key, []).append(e.phrase)
    return {k: tuple(v) for k, v in out.items()}


def extensions_sha256(synonyms: str) -> str:
    """Checksum of the extension file (part of the match stage's revision when extensions are on)."""
    import hashlib

    blob = resources.files("models.data.synonyms").joinpath(EXTENSION_FILES[synonyms]).read_bytes()
    return hashlib.sha256(blob).hexdigest()


def _possessor(text: str) -> str | None:
    """The text before the last possessive marker ("the cows' heads" -> "the cows"), or None."""
    ms = list(_POSSESSIVE.finditer(text.lower()))
    return text[: ms[-1].start()] if ms and ms[-1].start() > 0 else None


def partitive_kind(head: str) -> str | None:
    """The PARTITIVES kind of an entity's head noun ("groups" -> collective), or None."""
    ws = words(head)
    if not ws:
        return None
    w = ws[-1]
    for cand in (w, IRREGULAR.get(w, w), w[:-2] if w.endswith("es") else w, w[:-1] if w.endswith("s") else w):
        if cand in PARTITIVES:
            return PARTITIVES[cand]
    return None


@dataclass(slots=True, frozen=True)
class VocabClass:
    """One annotated class with the phrases that name it."""

    category_id: int
    label: str  # the detection file's name, unchanged
    key: str  # paraphrase-list key ("" when the class has no list)
    names: tuple[str, ...]  # lower-cased own names ("Cabinet/shelf" -> cabinet, shelf)
    synonyms: tuple[str, ...]  # the paraphrase list (order kept; used by the reference matcher)
    extensions: tuple[str, ...] = ()  # reltag's extension phrases (correct mode only; see extensions/)


@dataclass(slots=True, frozen=True)
class Match:
    """A caption entity matched to a class: which rule, which listed phrase, which words of the span."""

    category_id: int
    label: str
    rule: str  # name / synonym / lemma / reference
    synonym: str  # the listed phrase that matched
    start: int = -1  # word span [start, end) in words(text); -1 in reference mode
    end: int = -1


class Vocabulary:
    """Phrases of every class, indexed by their words and by their words' lemmas.

    Correct mode (`match`): the phrase must cover the entity's head word; the longest phrase wins; on a tie in
    length the rule ranks name < synonym < extension < lemma, then the lowest category id wins. The span is
    chosen over the whole vocabulary before the image's classes are consulted, so "a hot dog" is a hot dog
    even when only a dog is annotated (and then matches nothing); a phrase listed for several classes picks
    among those present in the image. A body part that the lists give the person class, owned by something
    ("the cow's head"), names its owner instead. Extension phrases (reltag's, built with extensions=True)
    match like the others, except those marked not_with_of on an entity with an "of" complement and those
    right after a word of their not_after list ("its mother").
    """

    def __init__(self, classes: list[VocabClass], synonyms: str, extensions_on: bool = False):
        ids = [c.category_id for c in classes]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"vocabulary {synonyms!r} has duplicate category ids {dup}")
        self.synonyms_source = synonyms
        self.extensions = extensions_on
        self.classes = classes
        self.by_id = {c.category_id: c for c in classes}
        self._vocab_words: set[str] = set()
        phrases: list[tuple[tuple[str, ...], int, str, str]] = []  # words, category id, rule, phrase
        for c in classes:
            seen: set[tuple[str, ...]] = set()
            for rule, plist in (("name", c.names), ("synonym", c.synonyms), ("extension", c.extensions)):
                for p in plist:
                    w = tuple(words(p))
                    if w and w not in seen:
                        seen.add(w)
                        phrases.append((w, c.category_id, rule, p))
                        self._vocab_words.update(w)
        self._exact: dict[tuple[str, ...], list[tuple[int, str, str]]] = {}
        self._lemma: dict[tuple[str, ...], list[tuple[int, str, str]]] = {}
        for w, cid, rule, p in phrases:
            self._exact.setdefault(w, []).append((cid, rule, p))
            # a lemma match keeps the "extension" rule: the stats count what each extension phrase bought
            lemma_rule = "extension" if rule == "extension" else "lemma"
            self._lemma.setdefault(tuple(self.lemma(x) for x in w), []).append((cid, lemma_rule, p))
        self.max_words = max((len(w) for w, *_ in phrases), default=0)
        # the extension phrases' vetoes by (category id, phrase): no "of" complement, not right after given words
        entries = {(e.key, e.phrase): e for e in extensions(synonyms)} if extensions_on else {}
        self._not_with_of: set[tuple[int, str]] = set()
        self._not_after: dict[tuple[int, str], set[str]] = {}
        for c in classes:
            for p in c.extensions:
                e = entries.get((c.key, p))
                if e is not None and e.not_with_of:
                    self._not_with_of.add((c.category_id, p))
                if e is not None and e.not_after:
                    self._not_after[(c.category_id, p)] = set(e.not_after)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_categories(
        cls, categories: list[dict], synonyms: Literal["o365", "coco"], extensions: bool = False
    ) -> Vocabulary:
        """Vocabulary for a detection file's categories `[{"id", "name"}, ...]` with a shipped synonym list.

        extensions: also reltag's extension phrases of that list (models/data/synonyms/extensions/), for the
        correct mode; the reference lists are never changed by them.

        o365: the paraphrase keys are the official names lower-cased and typo-fixed, in id order, so a
        category takes the key at its official position when its name is the official one (case and
        surrounding spaces ignored), else the key equal to its lower-cased name. coco: keyed by name.
        A category with no key still matches by its own names.
        """
        if synonyms not in ("o365", "coco"):
            raise ValueError(f"synonyms must be 'o365' or 'coco', got {synonyms!r}")
        if synonyms == "o365":
            para = _read_json("o365_obj_paraphrase.json")
            official = sorted(_read_json("o365_categories.json"), key=lambda d: d["id"])
            key_of_official = {(d["id"], _norm(d["name"])): k for d, k in zip(official, para, strict=True)}
        else:
            para = _read_json("coco_obj_paraphrase.json")
            key_of_official = {(i, n): n for n, i in _read_json("coco_object_names.json").items()}
        ext = extension_phrases(synonyms) if extensions else {}
        out = []
        for d in categories:
            if not isinstance(d, dict) or "id" not in d or "name" not in d:
                raise ValueError(f"category {d!r} needs 'id' and 'name'")
            cid, name = d["id"], d["name"]
            if not isinstance(cid, int) or not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"category {cid!r} has id {cid!r} / name {name!r}; need an int id and a non-empty name"
                )
            norm = _norm(name)
            key = key_of_official.get((cid, norm))
            if key is None and norm in para:
                key = norm
            if key is None and synonyms == "o365":  # an Objects365 v1 name: the v2 list it maps to, if any
                key = _o365_v1_to_v2().get(norm)
            names = _split_names(name)
            if key is not None:  # the typo-fixed key is a name too ("Bakset" -> "basket")
                names = list(dict.fromkeys(names + _split_names(key)))
            out.append(
                VocabClass(
                    cid, name, key or "", tuple(names), tuple(para.get(key, ())) if key else (),
                    tuple(ext.get(key, ())) if key else (),
                )
            )  # fmt: skip
        return cls(out, synonyms, extensions)

    @classmethod
    def load(cls, synonyms: Literal["o365", "coco"], extensions: bool = False) -> Vocabulary:
        """The full shipped list: all 365 Objects365 or all 80 COCO classes with their official ids."""
        if synonyms == "o365":
            cats = _read_json("o365_categories.json")
        elif synonyms == "coco":
            cats = [{"id": i, "name": n} for n, i in _read_json("coco_object_names.json").items()]
        else:
            raise ValueError(f"synonyms must be 'o365' or 'coco', got {synonyms!r}")
        return cls.from_categories(cats, synonyms, extensions)

    # ---- lemmas ---------------------------------------------------------------------------------------
    def lemma(self, w: str) -> str:
        """Singular form of a plural word when that form is a vocabulary word ("knives" -> "knife")."""
        if w in IRREGULAR:
            return IRREGULAR[w]
        if len(w) < 3 or not w.endswith("s") or w.endswith("ss"):
            return w
        cands = []
        if w.endswith("ies"):
            cands += [w[:-1], w[:-3] + "y"]  # cookies -> cookie, berries -> berry
        elif w.endswith("ves"):
            cands += [w[:-1], w[:-3] + "f", w[:-3] + "fe"]  # gloves, shelves, knives
        elif w.endswith("es"):
            cands += [w[:-1], w[:-2]]  # horses -> horse, benches -> bench
        else:
            cands.append(w[:-1])
        for c in cands:
            if c in self._vocab_words:
                return c
        return w

    # ---- correct mode ---------------------------------------------------------------------------------
    def match(
        self, text: str, head: str = "", present: set[int] | None = None, of_complement: bool = False
    ) -> Match | None:
        """The class the entity `text` names, or None.

        Args:
            text: the entity span ("a man's hat").
            head: the entity's head noun (sng_parser's head, compounds included: "tennis shoes"); its last
                word must be inside the matched phrase. Empty: the span's last word.
            present: category ids annotated in the image; None accepts every class.
            of_complement: the entity has an "of" complement in its caption ("a pitcher" -of-> "water"); the
                extension phrases marked not_with_of do not apply to it.
        """
        toks = words(text)
        if not toks:
            return None
        lem = [self.lemma(t) for t in toks]
        hw = words(head)
        h = len(toks) - 1
        if hw:
            pos = [i for i, t in enumerate(toks) if t == hw[-1]]
            if pos:
                h = pos[-1]
        best = None  # (sort key, start, end, entries-with-rule)
        for start in range(max(0, h - self.max_words + 1), h + 1):
            for end in range(h + 1, min(len(toks), start + self.max_words) + 1):
                exact = self._exact.get(tuple(toks[start:end]), [])
                entries = [(cid, rule, p) for cid, rule, p in exact]
                got = {cid for cid, _, _ in exact}
                for cid, rule, p in self._lemma.get(tuple(lem[start:end]), []):
                    if cid not in got:
                        entries.append((cid, rule, p))
                if of_complement and self._not_with_of:
                    entries = [e for e in entries if (e[0], e[2]) not in self._not_with_of]
                if start and self._not_after:
                    entries = [
                        e for e in entries if toks[start - 1] not in self._not_after.get((e[0], e[2]), ())
                    ]
                if not entries:
                    continue
                n = end - start
                # longer first; then the phrase ending at the head (the noun) over one running past it;
                # then the later start (deterministic)
                key = (-n, end != h + 1, -start)
                if best is None or key < best[0]:
                    best = (key, start, end, entries)
        if best is None:
            return None
        _, start, end, entries = best
        if all(e[2] in BODY_PARTS for e in entries) and (owner := _possessor(text)) is not None:
            # "the cow's head" is in the cow's box, whoever else is in the picture; an owner that names no
            # annotated class ("the statue's head") matches nothing rather than a person
            return self.match(owner, "", present)
        ok = [e for e in entries if present is None or e[0] in present]
        if not ok:
            return None
        cid, rule, p = min(ok, key=lambda e: (RULE_RANK[e[1]], e[0], e[2]))
        return Match(cid, self.by_id[cid].label, rule, p, start, end)

    def match_phrase(
        self, phrase: str, present: set[int] | None = None, partitives: bool = True
    ) -> Match | None:
        """The class a whole noun phrase names, the way the correct-mode match stage decides it.

        The stage gets entities already split by the parser ("a group" -of-> "sheep"); this takes the phrase as
        written: "a group of sheep" -> sheep (a partitive head with an "of" complement is matched by the
        complement), "a cup of coffee" -> cup (the head is the noun before "of"), "a man's hat" -> hat.
        """
        of = re.search(r"\bof\b", phrase.lower())
        if of:
            before, after = phrase[: of.start()].strip(), phrase[of.end() :].strip()
            if partitives and partitive_kind(before) and words(after):
                return self.match_phrase(after, present, partitives)
            return (
                self.match(before, "", present, of_complement=bool(words(after))) if words(before) else None
            )
        return self.match(phrase, "", present)

    # ---- reference mode -------------------------------------------------------------------------------
    def match_reference(self, span: str, image_classes: list[int]) -> Match | None:
        """The original RLIPv2 matcher, reproduced exactly: for each class of the image, in the order its
        boxes first appear, a raw substring test of every listed phrase against the raw span; the last
        class that hits wins (BLIP_o365_caption_helper.MatchWithGTbboxes_O365, strategy 'paraphrases').
        The span is lower-cased first, as the original's grammartical_tranform did before matching. A class
        without a list uses its own names.
        """
        span = span.lower()
        hit = None
        for cid in image_classes:
            c = self.by_id.get(cid)
            if c is None:
                continue
            for p in c.synonyms or c.names:
                if p in span:
                    hit = Match(cid, c.label, "reference", p)
                    break  # the original keeps scanning but only records the class; the first phrase names it
        return hit


# ---- which vocabulary a detection file uses -----------------------------------------------------------------

EDITIONS = {"coco": "COCO's", "o365_v2": "Objects365 v2's", "o365_v1": "Objects365 v1's"}
VOCABULARY_OF = {"coco": "coco", "o365_v2": "o365", "o365_v1": "o365"}


@cache
def _editions() -> dict[str, frozenset[tuple[int, str]]]:
    """(category id, normalised name) of every official category of each edition. Objects365 v2 also under its
    typo-fixed list key ("Bakset" -> "basket"), since files in the wild carry either."""
    official = sorted(_read_json("o365_categories.json"), key=lambda d: d["id"])
    v2 = {(d["id"], _norm(d["name"])) for d in official}
    v2 |= {(d["id"], k) for d, k in zip(official, _read_json("o365_obj_paraphrase.json"), strict=True)}
    return {
        "coco": frozenset((i, _norm(n)) for n, i in _read_json("coco_object_names.json").items()),
        "o365_v2": frozenset(v2),
        "o365_v1": frozenset((d["id"], _norm(d["name"])) for d in _o365_v1()["categories"]),
    }


@dataclass(frozen=True)
class Identified:
    """Which edition's categories a file's are: an edition fits when every category is one of its (id, name).

    vocabulary: "coco" / "o365" when exactly one vocabulary fits (Objects365 v1 and v2 are one vocabulary:
    v1 names take the v2 lists), else None. edition: the fitting edition (v2 before v1 when both fit).
    """

    n: int
    hits: dict[str, int]
    first_miss: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def fits(self) -> list[str]:
        return [e for e in EDITIONS if self.n and self.hits[e] == self.n]

    @property
    def vocabulary(self) -> str | None:
        vocabs = {VOCABULARY_OF[e] for e in self.fits}
        return vocabs.pop() if len(vocabs) == 1 else None

    @property
    def edition(self) -> str | None:
        return self.fits[0] if self.vocabulary else None

    def describe(self) -> str:
        """The line saying what was inferred and from what."""
        line = f"vocabulary: {self.vocabulary} ({self.evidence()}"
        if self.edition == "o365_v1":
            line += "; v1 names take the v2 synonym lists of models/data/synonyms/o365_v1.json"
        return line + ")"

    def evidence(self) -> str:
        """What the edition rests on, e.g. "80 of 80 categories are COCO's"."""
        e = self.edition
        if e is None:
            raise ValueError(self._why())
        return f"{self.hits[e]} of {self.n} categories are {EDITIONS[e]}"

    def require(self) -> str:
        """The vocabulary, or a one-line error asking for --vocabulary."""
        if self.vocabulary is None:
            raise ValueError(self._why())
        return self.vocabulary

    def _why(self) -> str:
        ask = "; pass --vocabulary {o365,coco} (and --dataset NAME)"
        if len(self.fits) > 1:
            both = " and ".join(f"{EDITIONS[e][:-2]} ({self.hits[e]} of {self.n})" for e in self.fits)
            return f"cannot tell the vocabulary: the categories fit both {both}" + ask
        parts = []
        for e, name in EDITIONS.items():
            miss = self.first_miss.get(e)
            got = f"{name[:-2]}'s ({self.hits[e]} of {self.n})"
            parts.append(got + (f", not category {miss[0]} {miss[1]!r}" if miss else ""))
        return "cannot tell the vocabulary: the categories are not all " + "; not all ".join(parts) + ask


def identify_vocabulary(categories: list[dict]) -> Identified:
    """Count, per edition (COCO, Objects365 v2, v1), the categories whose (id, name) are that edition's (names
    compared lower-cased with spaces collapsed)."""
    hits = dict.fromkeys(EDITIONS, 0)
    first_miss: dict[str, tuple[int, str]] = {}
    for d in categories:
        pair = (d["id"], _norm(str(d["name"])))
        for e, known in _editions().items():
            if pair in known:
                hits[e] += 1
            else:
                first_miss.setdefault(e, (d["id"], d["name"]))
    return Identified(len(categories), hits, first_miss)
