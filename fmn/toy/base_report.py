"""Measure a toy base model: shape and colour accuracy on 5 shapes x 5 colours x N seeds.

    .venv/bin/python -m fmn.toy.base_report [--name toy|toy-mmdit] [--model PATH] [--seeds 4] [--out bench/results]

For "toy" also measures where the model reads the shape from (fmn.toy.evaluate.slot_control).
Writes toy_base.json (toy_mmdit_base[_msl<N>].json for --name toy-mmdit: accuracies, per shape/colour, slot
control, timing, model size, training info) and toy_base_grid.png (likewise named; one
seed; rows: shapes, columns: colours) into --out.
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

    from fmn.toy import (MODELS, evaluate, load_classifier, load_pipeline, model_path, prompt_set, save_grid,
                         slot_control)
    from fmn.toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", choices=sorted(MODELS), default="toy", help="which built-in model (kind of --model)")
    ap.add_argument("--model", default=None, help="a pipeline folder of that kind (default: the shipped one)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--templates", nargs="+", default=["a {c} {s}", "a photo of a {c} {s}"])
    ap.add_argument("--out", default=None, help="folder for toy_base.json and toy_base_grid.png (none: print only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-sequence-length", type=int, default=None,
                    help="toy-mmdit: zero T5 tokens appended to the prompt (pipeline default 256; the model is "
                         "trained for 1..256, and 1 runs ~4x faster)")
    args = ap.parse_args(argv)
    if args.max_sequence_length is not None and args.name != "toy-mmdit":
        ap.error("--max-sequence-length applies to --name toy-mmdit only")
    pipe_kwargs = {} if args.max_sequence_length is None else {"max_sequence_length": args.max_sequence_length}
    torch.set_num_threads(args.threads)

    path = args.model or model_path(args.name)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.name, path=path)
    load_s = time.perf_counter() - t0
    clf = load_classifier()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results = {}
    grid_images = None
    for g in args.guidance:
        for tpl in args.templates:
            m = evaluate(pipe, prompt_set(tpl), seeds, classifier=clf, guidance_scale=g,
                         num_inference_steps=args.steps, return_images=True, **pipe_kwargs)
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
    control = None
    if args.name == "toy":  # slot_control encodes prompts the StableDiffusionPipeline way
        control = slot_control(pipe, clf, seeds=seeds[:2], num_inference_steps=args.steps)
        print(f"shape read from: word slot {control['word']:.2f}, end slots {control['end']:.2f} "
              f"(share of {control['n_images'] // 2} images each that follow the swapped-in slot)", flush=True)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    info_p = Path(path) / "training_info.json"
    modules = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    report = {
        "model": args.name,
        "model_path": f"fmn/assets/toy/{MODELS[args.name]}" if args.model is None else str(path),
        "model_size_bytes": size,
        "load_seconds": load_s,
        "params": {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in modules
                   if getattr(pipe, k, None) is not None},
        "training": json.loads(info_p.read_text()) if info_p.exists() else None,
        "slot_control": control,
        "eval": {"seeds": seeds, "num_inference_steps": args.steps, "pipe_kwargs": pipe_kwargs, "results": results,
                 "prompts": "5 shapes x 5 colours per template", "torch_threads": args.threads},
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "toy_base" if args.name == "toy" else args.name.replace("-", "_") + "_base"
        if args.max_sequence_length is not None:
            stem += f"_msl{args.max_sequence_length}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        save_grid(out / f"{stem}_grid.png",
                  {f"{args.name} base model, seed {seeds[0]} (rows: shapes, cols: colours)": grid_images}, scale=3)
        print("wrote", out / f"{stem}.json", out / f"{stem}_grid.png")
    return report


if __name__ == "__main__":
    main()
