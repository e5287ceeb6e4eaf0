"""How forgotten a concept stays on the built-in toy models (issue 17, item 3): the paper's Memorization
Score and an inversion attack, for fmn's defaults (the closed-form edit), fmn's attention-loss rule, the rule
followed by the closed-form edit (method "attention+closed-form"), the inversion defence on either
(+inversion: fmn.toy.robustness.forget_with_inversion, the attack's own inversion with other seeds, then the
inverted token forgotten with the word) and ESD-x, plus the base model for reference.

Per concept and method: forget (forgetting seed 1, as bench_quality --all), then
  MS       Memorization Score: cosine of the token inverted on the model to the concept word's embedding
           (toy text encoder, at the word's slot), and its change from the base model's inversion
  attack   share of 5 prompts x 4 seeds drawn from the token inverted on the model that show the concept
  UA, IRA/base, CRA/base on the held-out split (the defence's cost), unless --no-eval
Writes bench/results/robustness_cpu.json (--model toy-mmdit: robustness_toy_mmdit_cpu.json), rows as they come.

    python bench/bench_robustness.py [--model toy-mmdit] [--concepts circle red] [--methods fmn fmn+inversion]
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ATTENTION_RULE, ESD_LR, defaults_for, make_model  # noqa: E402
from common import RESULTS, machine_info, print_table, write_json_atomic  # noqa: E402

from fmn.families import family_for  # noqa: E402
import fmn  # noqa: E402
from fmn.toy import evaluate_split, load_classifier, load_pipeline, relative_to  # noqa: E402
from fmn.toy import robustness as rb  # noqa: E402

METHODS = ["base", "fmn", "fmn attention", "fmn attention+closed-form", "fmn+inversion", "fmn attention+inversion",
           "esd-x"]
COLUMNS = ["concept", "method", "MS", "MS_change", "attack", "UA", "IRA_rel", "CRA_rel", "train_s", "robust_s"]


def train(name, base, concept, args):
    """(pipeline, training seconds) of method `name`."""
    if name == "base":
        return base, 0.0
    pipe, t0 = copy.deepcopy(base), time.perf_counter()
    defaults = defaults_for(args.model)
    if name.endswith("+inversion"):
        method = "attention" if name.startswith("fmn attention") else "closed-form"
        rb.forget_with_inversion(pipe, concept, rounds=args.rounds, steps=args.steps, method=method,
                                 seed=args.forget_seed)
        return pipe, time.perf_counter() - t0
    if name == "fmn attention+closed-form":
        fmn.forget(pipe, [concept], inplace=True, progress=False,
                   **dict(defaults([concept], method="attention+closed-form"), seed=args.forget_seed))
        return pipe, time.perf_counter() - t0
    pipe, _, _, train_s = make_model(ATTENTION_RULE if name == "fmn attention" else name, base, [concept],
                                     args.esd_lr, None, seed=args.forget_seed, defaults=defaults)
    return pipe, train_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", choices=["toy", "toy-mmdit"])
    ap.add_argument("--concepts", nargs="+", default=["circle", "red"])
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the +inversion defences")
    ap.add_argument("--methods", nargs="+", default=["base", "fmn", "fmn attention", "fmn attention+closed-form",
                                                     "esd-x"], choices=METHODS)
    ap.add_argument("--steps", type=int, default=rb.INVERSION_STEPS, help="inversion steps (attack and MS)")
    ap.add_argument("--forget-seed", type=int, default=1)
    ap.add_argument("--esd-lr", type=float, default=None, help="default: bench_quality's for the model")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out UA / retain evaluation")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or RESULTS / ("robustness_toy_mmdit_cpu.json" if args.model == "toy-mmdit"
                                      else "robustness_cpu.json")
    args.esd_lr = args.esd_lr or ESD_LR[args.model]
    torch.set_num_threads(1)
    base = load_pipeline(args.model)
    classifier = load_classifier()
    from fmn.forgetting.runtime import accelerator
    accelerator()
    rows, base_eval = [], {}
    for concept in args.concepts:
        base_sim = None
        for name in args.methods:
            torch.manual_seed(0)
            pipe, train_s = train(name, base, concept, args)
            t0 = time.perf_counter()
            inv = rb.invert(pipe, concept, args.steps)
            sim = rb.embedding_similarity(inv["pipe"], concept)
            base_sim = sim if name == "base" else base_sim
            row = {"concept": concept, "method": name, "MS": sim,
                   "MS_change": None if base_sim is None else sim - base_sim,
                   "attack": rb.shown_rate(inv["pipe"], concept, classifier), "train_s": train_s,
                   "inversion_loss": [sum(inv["losses"][:20]) / 20, sum(inv["losses"][-20:]) / 20]}
            row["robust_s"] = time.perf_counter() - t0
            row["load_1min"] = os.getloadavg()[0]
            if not args.no_eval:
                m = evaluate_split(pipe, "held-out", forgotten=concept, classifier=classifier,
                                   **family_for(pipe).pipeline_kwargs())
                if name == "base":
                    base_eval[concept] = m
                rel = relative_to(m, base_eval[concept]) if concept in base_eval else {}
                row.update({"UA": m["ua"], "IRA_rel": rel.get("in_domain_retain_rel"),
                            "CRA_rel": rel.get("cross_domain_retain_rel")})
            rows.append(row)
            print_table(rows[-1:], COLUMNS)
            write_json_atomic(args.out, {
                "benchmark": f"robustness of forgetting on the built-in {args.model} model", "model": args.model,
                "machine": machine_info(), "inversion_defence_rounds": args.rounds,
                "inversion": {"steps": args.steps, "lr": rb.INVERSION_LR, "batch": 2, "probe_images": rb.PROBE_IMAGES,
                              "start": "random direction at the vocabulary's mean norm, seed 0"},
                "attack_images": f"5 probe prompts x seeds {list(rb.ATTACK_SEEDS)}", "forget_seed": args.forget_seed,
                "rows": rows})
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
