"""Low-rank patches: forgetting quality on the built-in toy model against the rank, and the size
of an SD 2.1 attn2 patch at each rank.

One fmn run with the toy defaults forgets a concept ("circle"; forgetting seed 1, the held-out
convention of bench_quality.py); its fp16 delta patch is compressed (fmn.patches.compress) at fixed ranks
and at automatic ranks from relative error bounds, and each variant is evaluated like `fmn eval`
(5 shapes x 5 colours, classifier): UA, in-domain and cross-domain retain, on the two named splits
of fmn.toy.evaluate.SPLITS. The rank is CHOSEN on the tuning split (the smallest fixed rank whose
three figures all lie within 0.02 of the uncompressed patch's there) and REPORTED on the held-out
split (other seeds and caption forms: 2 x 25 prompts), which plays no part in the choice.

The SD 2.1 sizes are computed from the UNet config (bench/common.py: SD21_BASE_UNET), built on
the meta device: per attn2 weight [out, in] a rank-r pair holds r * (out + in) values, biases
stay whole, all in fp16.

    OMP_NUM_THREADS=1 python bench/bench_patch_rank.py [--concept circle] [--ranks 1 2 4 8 16] [--no-base]
Writes bench/results/patch_rank.json and patch_rank.png.
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SD21_BASE_UNET, machine_info, print_table, write_json_atomic  # noqa: E402

import fmn  # noqa: E402
from fmn.patches.compress import compress  # noqa: E402
from fmn.toy import SPLITS, evaluate_split, load_classifier, load_default_pipeline  # noqa: E402
from fmn.toy.defaults import forget_defaults  # noqa: E402

RANKS = [1, 2, 4, 8, 16]
REL_ERRORS = [0.2]
TOLERANCE = 0.02


def sd21_attn2_bytes(ranks) -> dict:
    """{"full": bytes of the fp16 full-delta patch, r: bytes at rank r} for SD 2.1's 16 attn2 layers."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
    shapes = [tuple(p.shape) for n, p in unet.named_parameters() if ".attn2." in n]
    out = {"full": 2 * sum(torch.Size(s).numel() for s in shapes), "n_tensors": len(shapes),
           "n_layers": sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))}
    for r in ranks:
        out[r] = 2 * sum(min(r * (s[0] + s[1]), s[0] * s[1]) if len(s) == 2 else s[0] for s in shapes)
    return out


def measure(pipe, concept, split, classifier):
    m = evaluate_split(pipe, split, forgotten=[concept], classifier=classifier)
    return {"UA": m["ua"], "IRA": m["in_domain_retain"], "CRA": m["cross_domain_retain"], "eval_s": m["seconds"],
            "n_images": m["n_images"]}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fixed = [r for r in rows if isinstance(r["rank"], int)]
    full = next(r for r in rows if r["variant"] == "uncompressed")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, colour in (("UA", "C0"), ("IRA", "C1"), ("CRA", "C2")):
        ax.plot([r["rank"] for r in fixed], [r["report"][key] for r in fixed], "o-", color=colour, label=key)
        ax.axhline(full["report"][key], color=colour, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank (dotted: uncompressed patch)")
    ax.set_ylabel("held-out split")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("toy model: forgetting quality of a rank-r patch")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--tune-split", default="tuning", choices=list(SPLITS))
    parser.add_argument("--report-split", default="held-out", choices=list(SPLITS))
    parser.add_argument("--seed", type=int, default=1, help="forgetting seed (the tuning of the defaults used 0)")
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument("--rel-errors", type=float, nargs="*", default=REL_ERRORS)
    parser.add_argument("--no-base", action="store_true", help="skip the base model's row")
    parser.add_argument("--out", type=Path, default=RESULTS / "patch_rank.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.tune_split == args.report_split:
        parser.error("--tune-split and --report-split must differ")
    torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()
    base, classifier = load_default_pipeline(), load_classifier()
    t0 = time.perf_counter()
    options = dict(forget_defaults([args.concept]), seed=args.seed)
    patch = fmn.forget(base, [args.concept], progress=False, **options)
    train_s = time.perf_counter() - t0
    sizes = sd21_attn2_bytes(RANKS + [32, 48, 64])
    variants = ([] if args.no_base else [("base", None, None)]) + [("uncompressed", None, None)]
    variants += [(f"rank {r}", r, None) for r in args.ranks]
    variants += [(f"auto, error <= {e}", None, e) for e in args.rel_errors]
    rows = []
    for name, rank, err in variants:
        pipe = copy.deepcopy(base)
        small = None
        if name != "base":
            small = patch if name == "uncompressed" else compress(patch, rank=rank, rel_error=err)
            small.apply(pipe)
        comp = small.summary.get("compression", {}) if small is not None else {}
        ranks = [v["rank"] for v in comp.get("per_tensor", {}).values() if v["rank"]]
        row = {"variant": name, "rank": rank, "rel_error_bound": err, "toy_bytes": small.nbytes if small else 0,
               "max_rel_error": comp.get("max_rel_error"), "ranks_used": [min(ranks), max(ranks)] if ranks else None,
               "tune": measure(pipe, args.concept, args.tune_split, classifier),
               "report": measure(pipe, args.concept, args.report_split, classifier),
               "load_average_1min_after": os.getloadavg()[0]}
        if rank:
            row["sd21_attn2_bytes"] = sizes[rank]
        rows.append(row)
        if any(r["variant"] == "uncompressed" for r in rows):
            write_result(args, options, train_s, sizes, rows)
        print_table([{"variant": name, **{f"{k} tune": v for k, v in row["tune"].items() if k != "eval_s"},
                      **{f"{k} report": v for k, v in row["report"].items() if k != "eval_s"},
                      "toy KiB": row["toy_bytes"] / 1024}],
                    ["variant", "UA tune", "IRA tune", "CRA tune", "UA report", "IRA report", "CRA report", "toy KiB"])
    chosen = write_result(args, options, train_s, sizes, rows)
    plot(rows, args.out.with_suffix(".png"))
    print(f"chosen rank {chosen}; SD 2.1 attn2 patch: full {sizes['full'] / 1e6:.1f} MB, "
          + ", ".join(f"rank {r} {sizes[r] / 1e6:.2f} MB" for r in RANKS + [32, 48, 64]))


def write_result(args, options, train_s, sizes, rows):
    """Writes the JSON (after every row, so that an interrupted run keeps its rows); returns the chosen rank."""
    full = next(r for r in rows if r["variant"] == "uncompressed")
    within = [r for r in rows if isinstance(r["rank"], int)
              and all(abs(r["tune"][k] - full["tune"][k]) <= TOLERANCE for k in ("UA", "IRA", "CRA"))]
    chosen = min((r["rank"] for r in within), default=None)
    result = {
        "benchmark": "low-rank patches: toy forgetting quality and SD 2.1 attn2 patch size against rank",
        "machine": machine_info(), "concept": args.concept, "forget_options": options, "train_s": train_s,
        "tune_split": [args.tune_split, [[f, list(s)] for f, s in SPLITS[args.tune_split]]],
        "report_split": [args.report_split, [[f, list(s)] for f, s in SPLITS[args.report_split]]],
        "tolerance": TOLERANCE, "threads": args.threads,
        "load_average_1_5_15min": {"start": args.load_start, "end": os.getloadavg()},
        "load_note": "2-core machine shared with other jobs; eval_s and train_s are wall times under that load",
        "rule": "chosen rank = smallest fixed rank whose UA, IRA, CRA on the tuning split are all within the "
                "tolerance of the uncompressed patch's; its held-out figures are the ones to quote",
        "chosen_rank": chosen, "sd21_attn2_bytes": {str(k): v for k, v in sizes.items()},
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    return chosen


if __name__ == "__main__":
    main()
