"""How forgotten a concept stays on the built-in toy models: an inversion attack and the paper's Memorization
Score, for fmn's default (the attention re-steering, then the closed-form edit), the closed-form edit alone, the
attention rule alone, the inversion defence (+inversion), ESD-x and fmn.suppress, beside the base model.

Per concept, method and forgetting seed: forget, then
  attack   share of 5 probe prompts x the split's attack seeds (8: 40 images) drawn from a token inverted on
           the forgotten model (fmn.toy.robustness) that show the concept again
  MS       Memorization Score: cosine of that token to the concept word's embedding (toy text encoder)
  UA, IRA/base, CRA/base on the split's evaluation prompts (the forgetting's cost)
Splits (SPLITS): "tuning" is what the defaults were tuned on (forgetting seed 1, attack seeds 0-7, the
tuning prompts); "held-out" is what is reported (forgetting seeds 2 and 3, attack seeds 100-107, other
inversion starts, the held-out prompts). Methods without randomness in their training (base, closed-form,
suppress) run once per concept. --inversions K runs K attacks (inversion starts) on each forgotten model: one
inversion either finds a way back or does not, so one per model gives a noisy figure. Rows (one per forgotten
model and attack) are appended to a .jsonl as they come (a rerun skips the rows it has and reuses their
evaluation); the summary (mean, min and max over every row per concept and method) goes to a .json and a .png.

    python bench/bench_robustness.py [--model toy-mmdit] [--split tuning] [--concepts circle red] [--markdown]
"""
import argparse
import copy
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ATTENTION_RULE, ESD_LR, defaults_for, make_model  # noqa: E402
from common import RESULTS, machine_info, print_table, write_json_atomic  # noqa: E402

import fmn  # noqa: E402
from fmn.families import family_for  # noqa: E402
from fmn.toy import evaluate_split, load_classifier, load_pipeline, relative_to  # noqa: E402
from fmn.toy import robustness as rb  # noqa: E402
from fmn.toy.data import COLORS, SHAPES  # noqa: E402

SPLITS = {
    "tuning": {"forget_seeds": [1], "attack_seeds": list(range(8)), "inversion_seed": 0},
    "held-out": {"forget_seeds": [2, 3], "attack_seeds": list(range(100, 108)), "inversion_seed": 1},
}
METHODS = ["base", "fmn", "fmn+preserve-base", "closed-form", "attention", "fmn+inversion", "esd-x", "suppress"]
# fmn, then the edit holds the kept prompts at the base's outputs, with adversarial rounds (docs/toy-tuning.md)
PRESERVE_BASE = {"preserve_base": True, "closed_form_rounds": 2}
SEEDLESS = {"base", "closed-form", "suppress"}  # no randomness in their training: one row per concept
GOALS = {"UA": 0.95, "IRA_rel": 0.95, "CRA_rel": 0.95, "attack": 0.2}  # attack: at most
COLUMNS = ["concept", "method", "seed", "inversion", "attack", "MS", "UA", "IRA_rel", "CRA_rel", "train_s", "robust_s"]


def plain(pipe):
    """The context to generate in for a method that changes the weights: none."""
    return nullcontext()


def train(name, base, concept, seed, args):
    """(pipeline, training seconds, the context to generate in as a function of the pipeline) of method
    `name`. suppress acts at generation, so the attack's images are drawn under fmn.suppress of the
    attack's own (token-bearing) pipeline: the token is not the concept's word, so nothing is zeroed for it."""
    defaults = defaults_for(args.model)
    if name == "base":
        return base, 0.0, plain
    if name == "suppress":
        return base, 0.0, lambda pipe: fmn.suppress(pipe, [concept])
    pipe, t0 = copy.deepcopy(base), time.perf_counter()
    if name == "fmn+inversion":
        rb.forget_with_inversion(pipe, concept, rounds=1, method="attention+closed-form", seed=seed)
    elif name in ("fmn", "fmn+preserve-base", "closed-form"):
        method = "closed-form" if name == "closed-form" else "attention+closed-form"
        extra = PRESERVE_BASE if name == "fmn+preserve-base" else {}
        fmn.forget(pipe, [concept], inplace=True, progress=False,
                   **dict(defaults([concept], method=method), seed=seed, **extra))
    else:
        pipe = make_model(ATTENTION_RULE if name == "attention" else name, base, [concept], args.esd_lr, None,
                          seed=seed, defaults=defaults)[0]
    return pipe, time.perf_counter() - t0, plain


def inversion_seed(split, seed, inversion) -> int:
    """The attack's inversion start for forgetting seed `seed`; inversion 0 is the one every row had before
    --inversions."""
    return split["inversion_seed"] + 10 * seed + 1000 * inversion


def measure(pipe, concept, split, seed, inversion, classifier, args, evaluation=None, drawing_in=plain) -> dict:
    """Attack, Memorization Score and the split's UA / retains of one forgotten model (`evaluation`: that
    model's, measured already; drawing_in: train's context to generate in)."""
    t0 = time.perf_counter()
    a = rb.attack(pipe, concept, classifier, args.inversion_steps, seeds=split["attack_seeds"],
                  seed=inversion_seed(split, seed, inversion), drawing_in=drawing_in)
    row = {"MS": rb.embedding_similarity(a["pipe"], concept), "attack": a["success"],
           "inversion_loss": [a["loss_first"], a["loss_last"]]}
    row["robust_s"] = time.perf_counter() - t0
    if evaluation is not None:
        return dict(row, eval=evaluation, eval_s=0.0)
    t0 = time.perf_counter()
    with drawing_in(pipe):
        m = evaluate_split(pipe, args.split, forgotten=concept, classifier=classifier,
                           **family_for(pipe).pipeline_kwargs())
    row["eval"] = {k: m[k] for k in ("ua", "in_domain_retain", "cross_domain_retain", "retain_shape_acc",
                                     "retain_color_acc") if k in m}
    row["eval_s"] = time.perf_counter() - t0
    return row


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def with_relative(rows: list[dict]) -> list[dict]:
    """Each row with UA and IRA / CRA relative to its concept's base row (when that is there)."""
    base = {r["concept"]: r["eval"] for r in rows if r["method"] == "base"}
    out = []
    for r in rows:
        rel = relative_to(r["eval"], base[r["concept"]]) if r["concept"] in base else {}
        out.append(dict(r, UA=r["eval"]["ua"], IRA_rel=rel.get("in_domain_retain_rel"),
                        CRA_rel=rel.get("cross_domain_retain_rel")))
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per concept and method: mean, min and max over its rows (forgetting seeds x attacks), how many attacks,
    and whether the goals are met."""
    groups = {}
    for r in with_relative(rows):
        groups.setdefault((r["concept"], r["method"]), []).append(r)
    out = []
    for (concept, method), rs in groups.items():
        s = {"concept": concept, "method": method, "seeds": sorted({r["seed"] for r in rs}), "attacks": len(rs)}
        for k in ("attack", "UA", "IRA_rel", "CRA_rel", "MS", "train_s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                s[k], s[k + "_min"], s[k + "_max"] = sum(vals) / len(vals), min(vals), max(vals)
        s["meets_goals"] = all(s.get(k) is not None and (s[k] <= v if k == "attack" else s[k] >= v)
                               for k, v in GOALS.items())
        out.append(s)
    return out


def markdown(summary: list[dict], methods: list[str]) -> str:
    """One line per concept: per method attack success (min-max over seeds), UA, IRA/CRA of base."""
    def cell(s):
        if s is None:
            return ""
        spread = f" ({s['attack_min']:.2f}-{s['attack_max']:.2f})" if s["attack_max"] > s["attack_min"] else ""
        return (f"{s['attack']:.2f}{spread} / {s['UA']:.2f} / {s.get('IRA_rel', float('nan')):.2f} / "
                f"{s.get('CRA_rel', float('nan')):.2f}" + (" ✓" if s["meets_goals"] else ""))
    by = {(s["concept"], s["method"]): s for s in summary}
    concepts = [c for c in SHAPES + COLORS if any(k[0] == c for k in by)]
    lines = ["| concept | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(cell(by.get((c, m))) for m in methods) + " |" for c in concepts]
    return "\n".join(lines)


def plot(summary: list[dict], methods: list[str], path: Path) -> None:
    """Attack success per concept and method (bars: mean over seeds; whiskers: min to max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {(s["concept"], s["method"]): s for s in summary}
    concepts = [c for c in SHAPES + COLORS if any(k[0] == c for k in by)]
    fig, ax = plt.subplots(figsize=(1.2 * len(concepts) + 2, 3.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs = [j + i * width for j, c in enumerate(concepts) if (c, m) in by]
        ss = [by[(c, m)] for c in concepts if (c, m) in by]
        ax.bar(xs, [s["attack"] for s in ss], width, label=m,
               yerr=[[s["attack"] - s["attack_min"] for s in ss], [s["attack_max"] - s["attack"] for s in ss]])
    ax.axhline(GOALS["attack"], color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(concepts))], concepts)
    ax.set_ylabel("attack success")
    ax.legend(fontsize=7, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args, out_jsonl: Path) -> None:
    split = SPLITS[args.split]
    evaluated = {(r["concept"], r["method"], r["seed"]): r["eval"] for r in load_rows(out_jsonl)}
    done = {(r["concept"], r["method"], r["seed"], r.get("inversion", 0)) for r in load_rows(out_jsonl)}
    torch.set_num_threads(args.threads)
    base, classifier = load_pipeline(args.model), load_classifier()
    for concept in args.concepts:
        for name in ["base"] + [m for m in args.methods if m != "base"]:
            for seed in split["forget_seeds"][:1] if name in SEEDLESS else split["forget_seeds"]:
                todo = [j for j in range(args.inversions) if (concept, name, seed, j) not in done]
                if todo:
                    run_one(args, out_jsonl, base, classifier, concept, name, seed, todo,
                            evaluated.get((concept, name, seed)))


def run_one(args, out_jsonl, base, classifier, concept, name, seed, inversions, evaluation) -> None:
    """Forget with method `name` and seed `seed`, then one row per attack in `inversions`; a failure is
    reported and the run goes on."""
    split = SPLITS[args.split]
    torch.manual_seed(0)
    try:
        pipe, train_s, drawing_in = train(name, base, concept, seed, args)
        for j in inversions:
            row = measure(pipe, concept, split, seed, j, classifier, args, evaluation, drawing_in)
            evaluation = row["eval"]
            row = {"concept": concept, "method": name, "seed": seed, "inversion": j, "split": args.split,
                   "train_s": train_s, **row, "load_1min": os.getloadavg()[0]}
            with out_jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print_table(with_relative(load_rows(out_jsonl))[-1:], COLUMNS)
    except Exception as e:  # noqa: BLE001 - a failing method is reported, the others go on
        print(f"{concept} / {name} / seed {seed}: {type(e).__name__}: {e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", choices=["toy", "toy-mmdit"])
    ap.add_argument("--split", default="held-out", choices=list(SPLITS))
    ap.add_argument("--concepts", nargs="+", default=SHAPES + COLORS)
    ap.add_argument("--methods", nargs="+", default=["base", "fmn", "closed-form", "esd-x", "suppress"],
                    choices=METHODS)
    ap.add_argument("--inversion-steps", type=int, default=rb.INVERSION_STEPS, help="the attack's inversion steps")
    ap.add_argument("--inversions", type=int, default=1, help="attacks (inversion starts) per forgotten model")
    ap.add_argument("--esd-lr", type=float, default=None, help="default: bench_quality's for the model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="summary .json (rows beside it as .jsonl)")
    ap.add_argument("--summary-only", action="store_true", help="summarize the rows there are; run nothing")
    ap.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    args = ap.parse_args()
    tag = ("toy_mmdit" if args.model == "toy-mmdit" else "toy") + ("_tuning" if args.split == "tuning" else "")
    args.out = args.out or RESULTS / f"robustness_{tag}_cpu.json"
    args.esd_lr = args.esd_lr or ESD_LR[args.model]
    out_jsonl = args.out.with_suffix(".jsonl")
    if not args.summary_only:
        run(args, out_jsonl)
    rows = load_rows(out_jsonl)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    summary = summarize(rows)
    write_json_atomic(args.out, {
        "benchmark": f"robustness of forgetting on the built-in {args.model} model", "model": args.model,
        "split": args.split, **SPLITS[args.split], "goals": GOALS, "machine": machine_info(),
        "inversion": {"steps": args.inversion_steps, "lr": rb.INVERSION_LR, "batch": 2,
                      "probe_images": rb.PROBE_IMAGES, "start": "random direction at the vocabulary's mean norm"},
        "summary": summary, "rows_file": out_jsonl.name})
    plot(summary, methods, args.out.with_suffix(".png"))
    print_table(summary, ["concept", "method", "seeds", "attacks", "attack", "attack_min", "attack_max", "UA",
                          "IRA_rel", "CRA_rel", "meets_goals"])
    if args.markdown:
        print(markdown(summary, methods))


if __name__ == "__main__":
    main()
