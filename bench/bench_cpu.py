"""fmn_kernels' native CPU backend: fused forward+backward with the concept score vs PyTorch.

Side by side in one run, forward + backward, CPU threads fixed (default 2):
  fused-cpu      fmn_kernels.cross_attention(backend="cpu"): the concept score too, no N x L map
  sdpa           torch.nn.functional.scaled_dot_product_attention, no score (the speed to match)
  materialising  fmn_kernels.cross_attention(backend="reference"): softmax map in memory (fp32)
Shapes: SD 1.5 / 2.1-base / XL cross-attention (L = 77, batch 2 as in classifier-free guidance
training), long keys (N = 1024, L = 4608, D = 128, MM-DiT-like) and, with --joint, N = L = 4608.
Inputs in diffusers' layout ([B, seq, H, D] memory viewed as [B, H, seq, D]).
Time: median of `--repeats` calls per round; providers take turns within a round and the figure
reported is the median over `--rounds` rounds (the machine is shared: the load average is
recorded). Peak memory: resident-set high-water mark above the start of one call (bench/common.py).
Writes bench/results/cpu_attention.json and .png.

    python bench/bench_cpu.py [--quick] [--joint] [--threads 2] [--rounds 3] [--dtype float32]
"""
import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, peak_memory_mib, print_table, time_ms, write_json_atomic  # noqa: E402

from fmn_kernels import cross_attention  # noqa: E402
from fmn_kernels.ops.cpu_attention import cpu_backend_available  # noqa: E402

# (name, batch, heads, N, L, D)
CASES = [
    ("sd15", 2, 8, 4096, 77, 40), ("sd15", 2, 8, 1024, 77, 80),
    ("sd21", 2, 5, 4096, 77, 64), ("sd21", 2, 10, 1024, 77, 64),
    ("sdxl", 2, 10, 4096, 77, 64), ("sdxl", 2, 20, 1024, 77, 64),
    ("long-keys", 1, 4, 1024, 4608, 128),
]
JOINT_CASE = ("joint", 1, 4, 4608, 4608, 128)
QUICK_CASES = [CASES[2], CASES[6]]
PROVIDERS = ("fused-cpu", "sdpa", "materialising")
CONCEPT_COLUMNS = [5, 6]


def make_case(batch, heads, n, l, d, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, s, heads, d, generator=g).to(dtype).transpose(1, 2) for s in (n, l, l))
    weights = torch.zeros(batch, l)
    weights[:, [c for c in CONCEPT_COLUMNS if c < l]] = 1.0
    return q, k, v, weights


def fwd_bwd(provider, q, k, v, weights):
    """One forward + backward of out.square().mean() (+ score.sum() where there is a score)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if provider == "sdpa":
        out, score = F.scaled_dot_product_attention(q, k, v), None
    else:
        backend = "cpu" if provider == "fused-cpu" else "reference"
        out, score = cross_attention(q, k, v, concept_weights=weights, backend=backend)
    loss = out.float().square().mean()
    if score is not None:
        loss = loss + score.sum()
    loss.backward()


def measure(cases, providers, dtype, rounds, repeats):
    times = {(c, p): [] for c in cases for p in providers}
    peaks = {}
    for r in range(rounds):
        for case in cases:
            inputs = make_case(*case[1:], dtype)
            for provider in providers:
                fn = functools.partial(fwd_bwd, provider, *inputs)
                times[(case, provider)].append(time_ms(fn, torch.device("cpu"), repeats))
                if r == 0:
                    peaks[(case, provider)] = peak_memory_mib(fn, torch.device("cpu"))
                print(f"round {r + 1}/{rounds} {case[0]} N={case[3]} L={case[4]} D={case[5]} {provider}: "
                      f"{times[(case, provider)][-1]:.1f} ms", flush=True)
    rows = []
    for case in cases:
        name, batch, heads, n, l, d = case
        sdpa_ms = statistics.median(times[(case, "sdpa")]) if "sdpa" in providers else float("nan")
        for provider in providers:
            ms = statistics.median(times[(case, provider)])
            map_mib = batch * heads * n * l * 4 / 2**20 if provider == "materialising" else 0.0
            rows.append(dict(model=name, B=batch, H=heads, N=n, L=l, D=d, provider=provider, ms=ms,
                             ms_rounds=times[(case, provider)], x_sdpa=ms / sdpa_ms,
                             peak_MiB=peaks[(case, provider)], attn_map_MiB=map_mib))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="SD 2.1 N=4096 and long keys, 1 round")
    parser.add_argument("--joint", action="store_true", help="add N = L = 4608 (slow: ~10 s per call)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args()
    if not cpu_backend_available():
        sys.exit("the native CPU backend is not built: run bash scripts/setup.sh")
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cases = QUICK_CASES if args.quick else CASES + ([JOINT_CASE] if args.joint else [])
    rounds = 1 if args.quick else args.rounds
    load_before = os.getloadavg()
    rows = measure(cases, PROVIDERS, dtype, rounds, args.repeats)
    load_after = os.getloadavg()

    columns = ["model", "B", "H", "N", "L", "D", "provider", "ms", "x_sdpa", "peak_MiB", "attn_map_MiB"]
    print()
    print_table(rows, columns)
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {args.threads} threads")
    out = args.out or RESULTS / f"cpu_attention{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, {
        "benchmark": "native CPU concept attention, forward + backward", "machine": machine_info(),
        "threads": args.threads, "dtype": str(dtype), "rounds": rounds, "repeats_per_round": args.repeats,
        "loss": "out.square().mean() + score.sum() (sdpa: no score)", "layout": "diffusers [B, seq, H, D] transposed",
        "load_average_before": load_before, "load_average_after": load_after,
        "memory_method": "resident-set high-water mark above the start of one call (see bench/common.py)",
        "rows": rows})
    plot(rows, out.with_suffix(".png"), f"{args.threads} threads, {dtype}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["model"], r["B"], r["H"], r["N"], r["L"], r["D"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(PROVIDERS)
    for ax, key, label in ((axes[0], "ms", "fwd+bwd time (ms, log)"), (axes[1], "peak_MiB", "peak memory (MiB, log)")):
        for i, provider in enumerate(PROVIDERS):
            values = [next((r[key] for r in rows if (r["model"], r["B"], r["H"], r["N"], r["L"], r["D"]) == s
                            and r["provider"] == provider), float("nan")) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], [max(v, 1e-3) for v in values], width, label=provider)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels([f"{m}\nB{b} H{h} N{n}\nL{l} D{d}" for m, b, h, n, l, d in shapes], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Concept attention forward + backward on CPU ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
