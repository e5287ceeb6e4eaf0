"""Tuning sweep for the toy model's forgetting defaults: candidate rules x concepts,
scored on the TUNING split only (fmn.toy.evaluate.SPLITS["tuning"]); the chosen rule goes into
fmn/toy/defaults.py and is reported on the held-out split by bench/bench_quality.py --all.

One JSON line per (rule, concept) run is appended to --out (default bench/results/sweep_toy_rules.jsonl),
plus a "base" line; --summary prints per rule the min / mean of UA and of the retains relative to base.

    python bench/sweep_toy_rules.py --rules wide-retain --concepts heart blue ...
    python bench/sweep_toy_rules.py --summary
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

import fmn  # noqa: E402
from fmn.toy import COLORS, SHAPES, evaluate_split, load_classifier, load_default_pipeline  # noqa: E402
from fmn.toy.defaults import forget_defaults  # noqa: E402

# each rule: overrides of the defaults of the time (commit ed6c2e5: anchor, retain by name, 100 steps per
# shape / 200 per colour, retain weight 8 on 32 cached samples of the concept's own images)
RULES = {
    "ed6c2e5": {},
    "wide-retain": {"retain_samples": 128, "retain_weight": 16.0},
    "own-images": {"retain_samples": 128, "retain_weight": 16.0, "retain_images": 4},
    "anchor-32": {"anchor_weight": 32.0},
    "shape-steps-150": {"steps": 150},  # for one shape only (a colour's default is 200)
}
KEEP = ("ua", "shape_acc", "color_acc", "in_domain_retain", "cross_domain_retain", "per_shape", "per_color",
        "per_concept", "n_images")


def record(m):
    return {k: m[k] for k in KEEP if k in m}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--concepts", nargs="+", default=list(SHAPES + COLORS))
    ap.add_argument("--split", default="tuning")
    ap.add_argument("--seed", type=int, default=0, help="forgetting seed")
    ap.add_argument("--base", action="store_true", help="also score the base model on the split")
    ap.add_argument("--out", type=Path, default=RESULTS / "sweep_toy_rules.jsonl")
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args()
    if a.summary:
        return summary(a.out, a.split)
    torch.set_num_threads(1)
    base = load_default_pipeline()
    classifier = load_classifier()

    def write(line):
        with open(a.out, "a") as f:
            f.write(json.dumps(line) + "\n")

    if a.base:
        m = evaluate_split(base, a.split, classifier=classifier)
        write({"rule": "base", "split": a.split, "metrics": record(m), "eval_s": m["seconds"]})
    for rule in a.rules:
        for c in a.concepts:
            pipe = copy.deepcopy(base)
            opts = dict(forget_defaults(c), **RULES[rule], seed=a.seed)
            t0 = time.perf_counter()
            patch = fmn.forget(pipe, c, inplace=True, progress=False, **opts)
            train_s = time.perf_counter() - t0
            m = evaluate_split(pipe, a.split, forgotten=c, classifier=classifier)
            write({"rule": rule, "concept": c, "split": a.split, "seed": a.seed, "train_s": train_s,
                   "eval_s": m["seconds"], "metrics": record(m),
                   "options": {k: v for k, v in opts.items() if k not in ("template",)},
                   "loss": [patch.summary["loss_before"], patch.summary["loss_after"]]})
            print(rule, c, f"UA {m['ua']:.2f} IRA {m['in_domain_retain']:.2f} CRA {m['cross_domain_retain']:.2f}",
                  f"train {train_s:.0f}s eval {m['seconds']:.0f}s", flush=True)


def summary(path, split):
    lines = [json.loads(x) for x in open(path)]
    base = next(x["metrics"] for x in lines if x["rule"] == "base" and x["split"] == split)
    by_rule = {}
    for x in lines:
        if x["rule"] == "base" or x["split"] != split:
            continue
        m, c = x["metrics"], x["concept"]
        dom = "shape" if c in SHAPES else "color"
        # in-domain / cross-domain retain relative to the base model's on the same images
        shape = dom == "shape"
        per, other = (base["per_shape"], base["color_acc"]) if shape else (base["per_color"], base["shape_acc"])
        bi = sum(v for k, v in per.items() if k != c) / (len(per) - 1)
        by_rule.setdefault(x["rule"], []).append((f"{c} s{x.get('seed', 0)}", m["ua"], m["in_domain_retain"] / bi,
                                                  m["cross_domain_retain"] / other))
    for rule, rows in by_rule.items():
        print(rule)
        for r in rows:
            print(f"  {r[0]:12s} UA {r[1]:.2f}  IRA {r[2]:.2f}  CRA {r[3]:.2f}")
        for i, k in ((1, "UA"), (2, "IRA"), (3, "CRA")):
            v = [r[i] for r in rows]
            print(f"  {k}: min {min(v):.2f} mean {sum(v) / len(v):.2f} (n={len(v)})")


if __name__ == "__main__":
    main()
