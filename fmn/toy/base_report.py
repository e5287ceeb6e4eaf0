"""Measure the toy base model: shape and colour accuracy on 5 shapes x 5 colours x N seeds.

    .venv/bin/python -m fmn.toy.base_report [--model PATH] [--seeds 4] [--out bench/results]

Also measures where the model reads the shape from (fmn.toy.evaluate.slot_control).
Writes toy_base.json (accuracies, per shape/colour, slot control, timing, model size, training info) and
toy_base_grid.png (one seed; rows: shapes, columns: colours) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None):
    import torch

    from fmn.toy import (default_model_path, evaluate, load_classifier, load_default_pipeline, prompt_set,
                         save_grid, slot_control)
    from fmn.toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--templates", nargs="+", default=["a {c} {s}", "a photo of a {c} {s}"])
    ap.add_argument("--out", default=None, help="folder for toy_base.json and toy_base_grid.png (none: print only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = args.model or default_model_path()
    t0 = time.perf_counter()
    pipe = load_default_pipeline(path=path)
    load_s = time.perf_counter() - t0
    clf = load_classifier()
    seeds = list(range(args.seeds))
    results = {}
    grid_images = None
    for g in args.guidance:
        for tpl in args.templates:
            m = evaluate(pipe, prompt_set(tpl), seeds, classifier=clf, guidance_scale=g,
                         num_inference_steps=args.steps, return_images=True)
            imgs = m.pop("images")
            m.pop("specs"), m.pop("predictions")
            if grid_images is None:
                grid_images = imgs[::len(seeds)]
            key = f"g{g}|{tpl}"
            results[key] = m
            print(f"guidance {g} template {tpl!r}: shape {m['shape_acc']:.3f} colour {m['color_acc']:.3f} "
                  f"both {m['both_acc']:.3f} ({m['seconds']:.1f} s for {m['n_images']} images)", flush=True)
            print("   per shape", {k: round(v, 3) for k, v in m["per_shape"].items()},
                  "per colour", {k: round(v, 3) for k, v in m["per_color"].items()}, flush=True)
    control = slot_control(pipe, clf, seeds=seeds[:2], num_inference_steps=args.steps)
    print(f"shape read from: word slot {control['word']:.2f}, end slots {control['end']:.2f} "
          f"(share of {control['n_images'] // 2} images each that follow the swapped-in slot)", flush=True)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    info_p = Path(path) / "training_info.json"
    report = {
        "model_path": "fmn/assets/toy/pipeline" if args.model is None else str(path),
        "model_size_bytes": size,
        "load_seconds": load_s,
        "params": {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")},
        "training": json.loads(info_p.read_text()) if info_p.exists() else None,
        "slot_control": control,
        "eval": {"seeds": seeds, "num_inference_steps": args.steps, "results": results,
                 "prompts": "5 shapes x 5 colours per template", "torch_threads": args.threads},
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "toy_base.json").write_text(json.dumps(report, indent=1))
        save_grid(out / "toy_base_grid.png", {"base model, seed 0 (rows: shapes, cols: colours)": grid_images},
                  scale=3)
        print("wrote", out / "toy_base.json", out / "toy_base_grid.png")
    return report


if __name__ == "__main__":
    main()
