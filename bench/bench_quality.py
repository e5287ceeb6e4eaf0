"""Forgetting quality on the built-in toy model: fmn vs baselines, UnlearnCanvas-style metrics.

For each forgetting task (one shape, two shapes at once, one colour) and each method, generate the
5 shapes x 5 colours prompt set ("a {colour} {shape}") with fixed seeds, classify every image with the
shipped classifier, and report:
  UA   unlearning accuracy: images from prompts naming a forgotten concept that do not show it
  IRA  in-domain retain accuracy (other shapes, or other colours, still right), also relative to base
  CRA  cross-domain retain accuracy (the other attribute still right, on all prompts), also relative
  time seconds spent making the method's model (training), and generating the evaluation images
Methods: the base model; a negative prompt; fmn.suppress (attention zeroed, no training); ESD-x
(negative-guidance fine-tune of attn2, 150 steps as fmn without an anchor, the same reference images,
its lr swept like fmn's); fmn forget with the toy defaults (attention loss, attn2, retain term, an
anchor shape or colour), without the anchor (150 steps), without anchor and retain (the paper's method
as is), and on the first task each loss (attention, visual, both) and trainable set (attn2, attn2-kv,
unet, lora) with the defaults' other options.
Writes bench/results/quality_cpu.json, a table, and quality_<task>.png grids (base | each method).

    python bench/bench_quality.py [--quick] [--seeds 4] [--tasks circle circle+square red]

--all: every one of the 5 shapes and 5 colours alone, and circle+square, red+blue, triangle+star+heart,
green+yellow+purple, on the held-out split (fmn.toy.evaluate.SPLITS: seeds and caption forms that
fmn/toy/defaults.py was not tuned on; forgetting seed 1, the tuning used 0), fmn's defaults vs negative
prompt, suppress and ESD-x; min and mean per method; quality_all_cpu.json + .png. Parts can run in
parallel (--tasks/--methods/--out) and be joined with --merge PART.json ... (--out: the joined file).

    python bench/bench_quality.py --all [--tasks ...] [--methods ...] [--out part.json]
    python bench/bench_quality.py --merge part1.json part2.json

--model toy-mmdit: the built-in MM-DiT toy model with its defaults (fmn/toy/mmdit_defaults.py), the same methods
(ESD-x on every joint-attention projection, at its own lr: ESD_LR) (default --out quality_all_toy_mmdit_cpu.json).
The "fmn" rows are the defaults (the closed-form edit), "fmn attention" the attention-loss rule
(forget_defaults(..., method="attention")).
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, print_table, write_json_atomic  # noqa: E402

import fmn  # noqa: E402
from fmn.families import family_for  # noqa: E402
from fmn.forgetting.baselines import esd  # noqa: E402
from fmn.toy import (COLORS, MODELS, SHAPES, SPLITS, evaluate, evaluate_split, load_classifier,  # noqa: E402
                     load_default_pipeline, load_pipeline, prompt_set, relative_to, save_grid, score)
from fmn.toy import mmdit_defaults  # noqa: E402
from fmn.toy.defaults import FORGET_DEFAULTS, forget_defaults  # noqa: E402

FMN_VARIANTS = ["fmn attention / attn2", "fmn attention / attn2, no anchor",
                "fmn attention / attn2, no anchor, no retain",
                "fmn attention / attn2-kv", "fmn attention / unet", "fmn attention / lora", "fmn visual / attn2",
                "fmn both / attn2"]


def methods(quick, first_task, anchored):
    """Every method on the first task; the baselines, fmn's defaults and fmn without the anchor (if the
    defaults have one) and without anchor and retain on the others (CPU time)."""
    names = ["base", "negative prompt", "suppress", "esd-x", "fmn"]
    fmn_names = FMN_VARIANTS if first_task and not quick else FMN_VARIANTS[:3]
    return names + [n for n in fmn_names if anchored or "no anchor" not in n]


def load_base(model):
    """The built-in "toy" / "toy-mmdit" by name, or a folder of the "toy" kind (default: the shipped "toy")."""
    return load_pipeline(model) if model in MODELS else load_default_pipeline(path=model)


def defaults_for(model):
    """The forget_defaults(concepts, anchor=...) function of the model's kind."""
    return mmdit_defaults.forget_defaults if model == "toy-mmdit" else forget_defaults


def make_model(name, base, concepts, esd_lr, lora_lr, seed=0, defaults=forget_defaults):
    """(pipeline to evaluate, extra evaluate() kwargs, context manager, training seconds)."""
    from contextlib import nullcontext
    if name == "base":
        return base, {}, nullcontext(), 0.0
    if name == "negative prompt":
        return base, {"negative_prompt": ", ".join(concepts)}, nullcontext(), 0.0
    if name == "suppress":
        return base, {}, fmn.suppress(base, concepts), 0.0
    pipe = copy.deepcopy(base)
    start = time.perf_counter()
    if name == "fmn":  # the defaults: the closed-form edit
        fmn.forget(pipe, concepts, inplace=True, progress=False, **dict(defaults(concepts), seed=seed))
        return pipe, {}, nullcontext(), time.perf_counter() - start
    drops = name.split(", ")[1:]
    opts = dict(defaults(concepts, anchor="no anchor" not in drops and name != "esd-x", method="attention"),
                seed=seed)
    default_train = opts.pop("train", "attn2")  # the model's trainable set, for its defaults' row
    if name == "esd-x":
        # ESD's prompts name the concept alone (its paper: the concept's name): the templates that name no
        # other shape or colour (ESD on "a red {}" learns to steer away from red too: CRA 0.0 on "circle");
        # as many reference images as fmn gets
        tpl = [t for t in opts["template"] if not set(t.split()) & set(SHAPES + COLORS)]
        n = opts["n_images"]
        prompts = [t.format(c) for c in concepts for t in tpl]
        gen_prompts = [tpl[i % len(tpl)].format(c) for c in concepts for i in range(n)]
        gens = [torch.Generator().manual_seed(seed + s) for s in range(len(gen_prompts))]
        latents = pipe(prompt=gen_prompts, generator=gens, output_type="latent", num_inference_steps=opts["gen_steps"],
                       guidance_scale=opts["guidance_scale"], **family_for(pipe).pipeline_kwargs()).images
        esd(pipe, concepts, latents, prompts=prompts, steps=opts["steps"], lr=esd_lr, train="attn2", seed=seed)
    else:
        loss, train = name.removeprefix("fmn ").split(", ")[0].split(" / ")
        if name == ATTENTION_RULE:
            train = default_train
        kw = dict(opts, lr=lora_lr) if train == "lora" else dict(opts)
        if "no retain" in drops:
            kw.pop("retain", None)  # with "no anchor": the paper's method as is
        fmn.forget(pipe, concepts, loss=loss, train=train, inplace=True, progress=False, **kw)
    return pipe, {}, nullcontext(), time.perf_counter() - start


ALL_TASKS = list(SHAPES) + list(COLORS) + ["circle+square", "red+blue", "triangle+star+heart", "green+yellow+purple"]
# ESD-x's lr per model: the largest that keeps both retains >= 0.85 of base on "circle" (150 steps). toy: see
# --esd-lr's help; toy-mmdit (tuning split, seed 0): 5e-4 UA 0.9 (1.00 / 1.00), 1e-3 UA 1.0 (1.00 / 0.96),
# 2e-3 UA 0.8 (0.53 / 0.68)
ESD_LR = {"toy": 2e-3, "toy-mmdit": 1e-3}
ATTENTION_RULE = "fmn attention / attn2"  # the built-in model's attention-loss rule (defaults(method="attention"))
ALL_METHODS = ["base", "negative prompt", "suppress", "esd-x", ATTENTION_RULE, "fmn"]
SHORT_NAMES = {ATTENTION_RULE: "fmn attention"}  # as the rows name them
COLUMNS = ["task", "method", "UA", "IRA", "CRA", "IRA_rel", "CRA_rel", "train_s", "eval_s"]


def run_all(args):
    """--all: every concept alone and four multi-concept tasks on the held-out split (seeds and caption forms
    the defaults were not tuned on; forgetting seed --forget-seed), rows written to --out as they come."""
    torch.set_num_threads(args.threads)
    base = load_base(args.model)
    defaults = defaults_for(args.model)
    classifier = load_classifier()
    from fmn.forgetting.runtime import accelerator
    accelerator()
    methods = args.methods or ALL_METHODS
    # the base model's images, scored anew per task; without "base" among the methods (a part run in parallel
    # with one that has it) the retains relative to base are filled in by --merge
    ref = evaluate_split(base, args.split, classifier=classifier, return_images=True) if "base" in methods else None
    tasks = [t.split("+") for t in (args.tasks or ALL_TASKS)]
    rows = []
    for concepts in tasks:
        base_m = ref and score(ref["specs"], ref["predictions"]["shape"], ref["predictions"]["color"], concepts)
        for name in methods:
            torch.manual_seed(0)
            if name == "base":
                m, train_s = dict(base_m, seconds=ref["seconds"]), 0.0
            else:
                pipe, eval_kw, context, train_s = make_model(name, base, concepts, args.esd_lr, args.lora_lr,
                                                             seed=args.forget_seed, defaults=defaults)
                with context:
                    m = evaluate_split(pipe, args.split, forgotten=concepts, classifier=classifier, **eval_kw)
            rel = relative_to(m, base_m) if base_m else {}
            rows.append({"task": "+".join(concepts), "method": SHORT_NAMES.get(name, name),
                         "UA": m["ua"], "IRA": m["in_domain_retain"], "CRA": m["cross_domain_retain"],
                         "IRA_rel": rel.get("in_domain_retain_rel"), "CRA_rel": rel.get("cross_domain_retain_rel"),
                         "train_s": train_s, "eval_s": m["seconds"], "n_images": m["n_images"],
                         "per_concept": m["per_concept"], "per_shape": m["per_shape"], "per_color": m["per_color"],
                         "load_1min": os.getloadavg()[0]})
            print_table(rows[-1:], COLUMNS)
            write_json_atomic(args.out, all_payload(args, rows))
    return rows


def all_payload(args, rows):
    return {"benchmark": f"forgetting quality on the built-in {args.model or 'toy'} model, every concept, "
                         f"{args.split} split", "model": args.model or "toy",
            "machine": machine_info(), "split": args.split, "groups": [[f, list(s)] for f, s in SPLITS[args.split]],
            "forget_seed": args.forget_seed,
            **task_options(args.model),
            "esd_lr": args.esd_lr, "rows": rows, "summary": summarise(rows), "missing": missing(rows)}


def task_options(model) -> dict:
    """The options of fmn's rows per task: its defaults ("fmn") and its attention-loss rule ("fmn attention")."""
    defaults = defaults_for(model)
    return {"forget_options": {t: defaults(t.split("+")) for t in ALL_TASKS},
            "attention_options": {t: defaults(t.split("+"), method="attention") for t in ALL_TASKS}}


def missing(rows):
    """The task / method pairs of the full table (ALL_TASKS x ALL_METHODS) that have no row: a file with any
    is partial."""
    have = {(r["task"], r["method"]) for r in rows}
    names = [SHORT_NAMES.get(m, m) for m in ALL_METHODS]
    return [f"{t} / {m}" for t in ALL_TASKS for m in names if (t, m) not in have]


def summarise(rows):
    """Per method: min and mean of UA and the retains relative to base, over the single concepts and over
    the multi-concept tasks."""
    out = []
    for kind, pick in (("single", lambda t: "+" not in t), ("multi", lambda t: "+" in t)):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["method"] == method and pick(r["task"])]
            if not sel:
                continue
            for stat, fn in (("min", min), ("mean", lambda v: sum(v) / len(v))):
                vals = {k: [r[k] for r in sel if r.get(k) is not None] for k in ("UA", "IRA", "CRA", "IRA_rel",
                                                                                  "CRA_rel", "train_s")}
                out.append({"task": f"{stat} ({kind}, {len(sel)})", "method": method,
                            **{k: fn(v) if v else None for k, v in vals.items()}})
    return out


def merge_all(paths, out):
    """Rows of several --all runs (parallel parts) into one file, with the summary and the plot."""
    import json
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for part in parts for r in part["rows"]]
    order = {t: i for i, t in enumerate(ALL_TASKS)}
    methods = [SHORT_NAMES.get(m, m) for m in ALL_METHODS]
    rows.sort(key=lambda r: (order.get(r["task"], 99), methods.index(r["method"]) if r["method"] in methods else 9))
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        b = base.get(r["task"])
        if r.get("IRA_rel") is None and b and r["IRA"] is not None and b["IRA"]:
            r["IRA_rel"], r["CRA_rel"] = r["IRA"] / b["IRA"], r["CRA"] / b["CRA"]
    payload = dict(parts[0], rows=rows, summary=summarise(rows), machine=[p["machine"] for p in parts],
                   missing=missing(rows), **task_options(parts[0].get("model", "toy")))
    write_json_atomic(out, payload)
    print_table(rows + payload["summary"], COLUMNS)
    plot_all(rows, out.with_suffix(".png"), parts[0].get("model", "toy"))
    print(f"wrote {out} and {out.with_suffix('.png')}" + (f"; PARTIAL, missing {len(payload['missing'])} rows"
                                                           if payload["missing"] else ""))


def plot_all(rows, path, model="toy"):
    """UA, in-domain and cross-domain retain (of base) per task, one bar per method, the 0.95 bar drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "base"]
    fig, axes = plt.subplots(3, 1, figsize=(14, 9), sharex=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, label in zip(axes, ("UA", "IRA_rel", "CRA_rel"), ("UA", "in-domain retain / base",
                                                                  "cross-domain retain / base")):
        for k, method in enumerate(methods):
            vals = {r["task"]: r[key] for r in rows if r["method"] == method}
            ax.bar([i + k * width for i in range(len(tasks))], [vals.get(t) or 0 for t in tasks], width, label=method)
        ax.axhline(0.95, color="k", lw=0.8, ls="--")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.05)
    axes[0].legend(ncol=len(methods), fontsize=8, loc="lower left")
    axes[-1].set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    fig.suptitle(f"{model} model, held-out seeds and caption forms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, one task, fmn default only")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 4; 2 with --quick)")
    parser.add_argument("--tasks", nargs="+", default=None, help="e.g. circle circle+square red")
    parser.add_argument("--model", default=None, help="'toy', 'toy-mmdit' (--all only) or a folder of the 'toy' kind "
                                                       "(default: the shipped 'toy')")
    parser.add_argument("--esd-lr", type=float, default=None,
                        help="ESD-x learning rate (its paper: 1e-5 on SD). On the toy model, 'circle', 150 steps, its "
                             "4 concept-only templates, 2 seeds: 2e-3 UA 0.3 (IRA 0.98, CRA 1.00 of base); 4e-3 UA 0.6 "
                             "(0.62, 0.74); 8e-3 UA 0.7 (0.30, 0.22): the largest lr that keeps both retains >= 0.85 "
                             "(default: ESD_LR for the model)")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="learning rate of the fmn LoRA variant")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_cpu.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is best when other jobs run)")
    parser.add_argument("--all", action="store_true",
                        help="every concept alone and 4 multi-concept tasks on --split, fmn's defaults vs the "
                             "baselines (default --out quality_all_cpu.json)")
    parser.add_argument("--split", default="held-out", choices=list(SPLITS))
    parser.add_argument("--forget-seed", type=int, default=1, help="--all: seed of fmn's and ESD-x's runs")
    parser.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS, help="--all: a subset")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="merge --all parts into --out, plot")
    args = parser.parse_args()
    args.esd_lr = args.esd_lr or ESD_LR.get(args.model or "toy", ESD_LR["toy"])
    if args.model == "toy-mmdit" and not (args.all or args.merge):
        parser.error("--model toy-mmdit runs with --all (its fmn variants and ESD-x are not wired in the default mode)")
    if (args.merge or args.all) and args.out == RESULTS / "quality_cpu.json":
        args.out = RESULTS / ("quality_all_toy_mmdit_cpu.json" if args.model == "toy-mmdit" else "quality_all_cpu.json")
    if args.merge:
        return merge_all(args.merge, args.out)
    if args.all:
        run_all(args)
        return
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds or (2 if args.quick else 4)))
    tasks = [t.split("+") for t in (args.tasks or (["circle"] if args.quick else ["circle", "circle+square", "red"]))]
    base = load_base(args.model)
    classifier = load_classifier()
    from fmn.forgetting.runtime import accelerator
    accelerator()  # accelerate's one-time import and set-up: in no method's time
    task_options = {"+".join(c): forget_defaults(c) for c in tasks}  # templates, retain, anchor are per task
    rows, grids = [], {}

    def write():
        write_json_atomic(args.out, {
            "benchmark": "forgetting quality on the built-in toy model", "machine": machine_info(),
            "prompts": [p.prompt for p in prompt_set()], "seeds": seeds, "forget_options": task_options,
            "esd_lr": args.esd_lr, "esd_steps": FORGET_DEFAULTS["steps"], "lora_lr": args.lora_lr,
            "metrics": "UA = share of images from prompts naming a forgotten concept that do not show it; IRA = the "
                       "forgotten concepts' domain still right on prompts naming none of them; CRA = the other "
                       "domain still right on all prompts; *_rel = divided by the base model's value",
            "rows": rows, "grids": {k: str(v.name) for k, v in grids.items()}})

    for task_index, concepts in enumerate(tasks):
        task = "+".join(concepts)
        base_metrics = None
        panels = {}
        grids[task] = args.out.parent / f"quality_{task}.png"
        for name in methods(args.quick, task_index == 0, bool(task_options[task].get("anchor"))):
            torch.manual_seed(0)
            pipe, eval_kw, context, train_s = make_model(name, base, concepts, args.esd_lr, args.lora_lr)
            with context:
                m = evaluate(pipe, forgotten=concepts, seeds=seeds, classifier=classifier, return_images=True,
                             **eval_kw)
            if name == "base":
                base_metrics = m
            rel = relative_to(m, base_metrics)
            rows.append({"task": task, "method": name, "UA": m["ua"], "IRA": m["in_domain_retain"],
                         "CRA": m["cross_domain_retain"], "IRA_rel": rel.get("in_domain_retain_rel"),
                         "CRA_rel": rel.get("cross_domain_retain_rel"), "train_s": train_s,
                         "eval_s": m["seconds"], "n_images": m["n_images"],
                         "per_concept": m["per_concept"]})
            print_table(rows[-1:], ["task", "method", "UA", "IRA", "CRA", "IRA_rel", "CRA_rel", "train_s", "eval_s"])
            first_seed = [i for i, _ in enumerate(m["specs"]) if i % len(seeds) == 0]
            panels[name] = m["images"][first_seed]
            save_grid(grids[task], panels)
            write()  # partial results survive an interrupted run
    print()
    print_table(rows, ["task", "method", "UA", "IRA", "CRA", "IRA_rel", "CRA_rel", "train_s", "eval_s"])
    write()
    print(f"wrote {args.out} and {', '.join(str(g) for g in grids.values())}")


if __name__ == "__main__":
    main()
