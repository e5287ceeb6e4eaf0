"""Concept correction on the built-in toy model (the paper's section 4.3): a prompt whose drawings are
dominated by one reading becomes diverse, while its words keep their meaning elsewhere.

1. Selection, on tuning seeds: the toy model's colour-only captions "a {c} shape" and "a photo of
   something {c}" never name a shape, and the data set pairs them with every shape alike; the base model
   draws each with tuning seeds, the classifier labels the shapes, and the prompt whose most frequent shape
   has the largest share is chosen (its corrected word: "shape" / "something", in the context template
   "a {c} {}" / "a photo of {} {c}").
2. Correction: `fmn forget --concept WORD --template CONTEXT --retain <each shape>` with
   - "closed form": the toy model's default method (no images, no training step);
   - "attention": the paper's attention re-steering loss (--no-closed-form: the toy's attention rule),
     on images the base model draws for the prompt;
   - "attention, dominant images": the same on the tuning images the classifier labels as the dominant
     shape (what a user hands fmn as "stop drawing this": --images DIR).
3. Report, on held-out seeds only: the prompt's shape distribution before and after (dominant share,
   normalised entropy over the 5 shapes, colour kept); elsewhere: "a {c} {s}" for that colour and every
   shape, the dominant shape in the other colours, and the corrected word in the other colours' contexts
   (share of seed-matched images whose shape changed).

Writes bench/results/correction_cpu.json and correction_cpu.png; prints the table (docs/concept-correction.md).

    python bench/bench_correction.py [--variants closed-form attention dominant] [--threads 1]
"""
import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, print_table, write_json_atomic  # noqa: E402

import fmn  # noqa: E402
from fmn.forgetting.presets import patched  # noqa: E402
from fmn.toy import COLORS, SHAPES, PromptSpec, generate, load_classifier, load_default_pipeline  # noqa: E402
from fmn.toy.classifier import SHAPE_CLASSES  # noqa: E402

TUNING_SEEDS = list(range(100, 116))      # selection and the dominant images
HELD_OUT_SEEDS = list(range(200, 248))    # the prompt's distribution, reported
ELSEWHERE_SEEDS = list(range(300, 308))   # named prompts, reported
CONTEXT_SEEDS = list(range(300, 312))     # the corrected word in the other colours' contexts
# colour-only caption -> (the word corrected, its context template); {c} the colour
FORMS = {"a {c} shape": ("shape", "a {c} {{}}"), "a photo of something {c}": ("something", "a photo of {{}} {c}")}
VARIANTS = {"closed-form": "closed form (toy default)", "attention": "attention (paper's loss)",
            "dominant": "attention, dominant images"}


def classify(pipe, clf, prompts, seeds):
    """{prompt: [shape class name per seed]}, {prompt: [colour per seed]}, images (prompts outer)."""
    images, _ = generate(pipe, [PromptSpec(p, None, None) for p in prompts], seeds)
    pred = clf.classify(images)
    n = len(seeds)
    shapes = {p: [SHAPE_CLASSES[k] for k in pred["shape"][i * n:(i + 1) * n].tolist()] for i, p in enumerate(prompts)}
    colors = {p: [COLORS[k] for k in pred["color"][i * n:(i + 1) * n].tolist()] for i, p in enumerate(prompts)}
    return shapes, colors, images


def distribution(labels) -> dict:
    """Counts over the shape classes (and none), max share, normalised entropy over the five shapes."""
    counts = {c: labels.count(c) for c in SHAPE_CLASSES}
    shares = [counts[s] / len(labels) for s in SHAPES]
    entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(SHAPES))
    top = max(SHAPES, key=lambda s: counts[s])
    return {"counts": counts, "top": top, "top_share": counts[top] / len(labels), "entropy": entropy,
            "n": len(labels)}


def select(pipe, clf) -> dict:
    """The colour-only caption with the most dominant shape on the tuning seeds, and every candidate's figures."""
    prompts = [form.format(c=c) for form in FORMS for c in COLORS]
    shapes, _, images = classify(pipe, clf, prompts, TUNING_SEEDS)
    cands = {p: distribution(shapes[p]) for p in prompts}
    best = max(prompts, key=lambda p: cands[p]["top_share"])
    form, color = next((f, c) for f in FORMS for c in COLORS if f.format(c=c) == best)
    word, context = FORMS[form]
    i = prompts.index(best) * len(TUNING_SEEDS)
    dominant = [img for img, s in zip(images[i:i + len(TUNING_SEEDS)], shapes[best]) if s == cands[best]["top"]]
    return {"prompt": best, "form": form, "color": color, "word": word, "context": context.format(c=color),
            "dominant": cands[best]["top"], "candidates": cands, "dominant_images": dominant}


def to_pil(images):
    from PIL import Image
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def correct(pipe, sel, variant):
    """The variant's patch (fmn.forget on the toy model: its defaults for the options not given)."""
    kw = dict(template=[sel["context"]], retain=list(SHAPES), progress=False)
    if variant == "attention":
        kw["closed_form"] = False
    elif variant == "dominant":
        kw.update(closed_form=False, images=to_pil(torch.stack(sel["dominant_images"])))
    t0 = time.perf_counter()
    patch = fmn.forget(pipe, sel["word"], **kw)
    return patch, time.perf_counter() - t0


def measure(pipe, clf, sel) -> dict:
    """Held-out figures of the current pipeline: the prompt's distribution, and the prompts elsewhere."""
    color, dom = sel["color"], sel["dominant"]
    shapes, colors, images = classify(pipe, clf, [sel["prompt"]], HELD_OUT_SEEDS)
    named = [f"a {color} {s}" for s in SHAPES] + [f"a {c} {dom}" for c in COLORS if c != color]
    n_shapes, n_colors, _ = classify(pipe, clf, named, ELSEWHERE_SEEDS)
    contexts = [sel["form"].format(c=c) for c in COLORS if c != color]
    c_shapes, _, _ = classify(pipe, clf, contexts, CONTEXT_SEEDS)
    named_ok = [s == p.split()[-1] and c == p.split()[1] for p in named for s, c in zip(n_shapes[p], n_colors[p])]
    return {"prompt": distribution(shapes[sel["prompt"]]),
            "prompt_color_kept": colors[sel["prompt"]].count(color) / len(HELD_OUT_SEEDS),
            "prompt_labels": shapes[sel["prompt"]],
            "named_both_right": sum(named_ok) / len(named_ok), "named_labels": n_shapes, "named_colors": n_colors,
            "context_labels": c_shapes, "images": images[:16]}


def changed_share(after: dict, before: dict) -> float:
    """Share of seed-matched images of the same prompts whose shape label differs."""
    pairs = [(a, b) for p in before for a, b in zip(after[p], before[p])]
    return sum(a != b for a, b in pairs) / len(pairs)


def row(name, m, base, seconds=None) -> dict:
    d = m["prompt"]
    return {"model": name, "top shape": f"{d['top']} {d['top_share']:.2f}",
            "dominant share": d["counts"][base["dominant"]] / d["n"], "entropy": d["entropy"],
            "colour kept": m["prompt_color_kept"], "named right": m["named_both_right"],
            "contexts changed": None if seconds is None else m.get("context_changed"),
            "counts": " ".join(f"{k[:3]}{v}" for k, v in d["counts"].items()),
            "s": seconds}


def plot(path, results, sel):
    """Images of the chosen prompt (16 held-out seeds) per model, and the shape distributions as bars."""
    from fmn.toy import save_grid
    panels = {k: v["images"] for k, v in results.items() if "images" in v}
    save_grid(path.with_name(path.stem + "_grid.png"), panels, ncols=8)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [k for k, v in results.items() if "prompt" in v]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(names)
    for i, k in enumerate(names):
        d = results[k]["prompt"]
        ax.bar([j + i * width for j in range(len(SHAPE_CLASSES))], [d["counts"][c] / d["n"] for c in SHAPE_CLASSES],
               width, label=k)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SHAPE_CLASSES))], SHAPE_CLASSES)
    ax.set_ylabel("share of images")
    ax.set_title(f'"{sel["prompt"]}": shapes drawn, held-out seeds {HELD_OUT_SEEDS[0]}-{HELD_OUT_SEEDS[-1]}')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "correction_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pipe, clf = load_default_pipeline(), load_classifier()
    sel = select(pipe, clf)
    print(f"selected {sel['prompt']!r}: {sel['dominant']} {sel['candidates'][sel['prompt']]['top_share']:.2f} on "
          f"tuning seeds; correcting {sel['word']!r} in {sel['context']!r}", flush=True)
    results = {"base": measure(pipe, clf, sel)}
    base_ctx = results["base"]["context_labels"]
    results["base"]["context_changed"] = 0.0
    seconds = {}
    for v in args.variants:
        name = VARIANTS[v]
        try:
            patch, seconds[name] = correct(pipe, sel, v)
            with patched(pipe, patch):  # the base weights back afterwards
                results[name] = measure(pipe, clf, sel)
            results[name]["context_changed"] = changed_share(results[name]["context_labels"], base_ctx)
        except Exception as e:  # a failing variant is recorded, the others still run
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    rows = [row(k, v, sel, seconds.get(k)) for k, v in results.items() if "prompt" in v]
    cols = ["model", "top shape", "dominant share", "entropy", "colour kept", "named right", "contexts changed",
            "counts", "s"]
    print_table(rows, cols)
    out = Path(args.out)
    plot(out.with_suffix(".png"), results, sel)
    payload = {
        "machine": machine_info(), "threads": args.threads, "seconds_total": time.perf_counter() - t_start,
        "seeds": {"tuning": TUNING_SEEDS, "held_out": HELD_OUT_SEEDS, "elsewhere": ELSEWHERE_SEEDS,
                  "contexts": CONTEXT_SEEDS},
        "selection": {k: v for k, v in sel.items() if k != "dominant_images"},
        "n_dominant_images": len(sel["dominant_images"]),
        "command": f"fmn forget --concept {sel['word']} --template \"{sel['context']}\" "
                   + " ".join(f"--retain {s}" for s in SHAPES) + " --out correction.safetensors",
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in results.items()},
        "train_seconds": seconds, "table": rows,
    }
    write_json_atomic(out, payload)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
