"""One candidate forgetting rule for the built-in toy-mmdit on one concept: forget with the UNet toy's recipe
(fmn.toy.defaults.forget_defaults) under the given overrides, score base and patched on a split.

    python bench/sweep_toy_mmdit.py CONCEPT ['{"lr": 5e-4, "retain_weight": 16}'] [--split tuning] [--seed 0]

Prints one JSON line (appended to bench/results/sweep_toy_mmdit.jsonl by hand for the runs quoted in
fmn/toy/mmdit_defaults.py). Backend "reference", 1 thread.
"""
import argparse
import json
import time

import torch

import fmn
from fmn.toy import SPLITS, evaluate_split, load_classifier, load_pipeline, relative_to
from fmn.toy.defaults import forget_defaults


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concept")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON dict of fmn.forget options")
    ap.add_argument("--split", default="tuning", choices=list(SPLITS))
    ap.add_argument("--seed", type=int, default=0, help="forgetting seed (the tuning used 0)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    over = json.loads(args.overrides)
    pipe, classifier = load_pipeline("toy-mmdit"), load_classifier()
    base = evaluate_split(pipe, args.split, forgotten=args.concept, classifier=classifier)
    start = time.perf_counter()
    patch = fmn.forget(pipe, args.concept, inplace=True, progress=False, backend="reference",
                       **{**forget_defaults(args.concept), "seed": args.seed, **over})
    train_s = time.perf_counter() - start
    m = evaluate_split(pipe, args.split, forgotten=args.concept, classifier=classifier)
    rel = relative_to(m, base)
    print(json.dumps({"concept": args.concept, "over": over, "split": args.split, "train_s": round(train_s, 1),
                      "eval_s": round(m["seconds"], 1),
                      "loss": [patch.summary["loss_before"], patch.summary["loss_after"]],
                      "UA": m["ua"], "IRA_rel": rel.get("in_domain_retain_rel"),
                      "CRA_rel": rel.get("cross_domain_retain_rel"), "base_ua": base["ua"],
                      "per_shape": m["per_shape"], "per_color": m["per_color"]}))


if __name__ == "__main__":
    main()
