"""Concept attention kernels: fused vs materialising vs PyTorch SDPA, forward / backward / both.

Shapes: every distinct cross-attention shape of SD 1.5, SD 2.1-base (512 px) and SDXL (1024 px),
L = 77 text tokens, batch 1, plus one long joint-attention case (L = N = 4608, D = 128, MM-DiT).
Providers:
  fused         fmn_kernels.cross_attention, Triton, with the concept score (GPU only: on CPU the
                Triton interpreter measures Python, not the kernel)
  materialising softmax map in memory, concept columns selected and squared (the authors' way)
  sdpa          torch.nn.functional.scaled_dot_product_attention, no score (the speed to match)
Metrics: median ms, achieved GB/s (compulsory bytes: q, k, v, out [+ dout, dq, dk, dv]) and TFLOP/s
(4 N L D per head forward, 2.5x that backward), peak memory above the inputs in MiB.
Writes bench/results/kernels_<device>.json and .png.

    python bench/bench_kernels.py [--quick] [--dtype float16] [--device cuda]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_tag, machine_info, peak_memory_mib, print_table, time_ms, write_json_atomic  # noqa: E402

from fmn_kernels import cross_attention  # noqa: E402

L_TEXT = 77
# (model, heads, query length N, key length L, head dim D)
CASES = [
    ("sd15", 8, 4096, L_TEXT, 40), ("sd15", 8, 1024, L_TEXT, 80), ("sd15", 8, 256, L_TEXT, 160),
    ("sd15", 8, 64, L_TEXT, 160),
    ("sd21", 5, 4096, L_TEXT, 64), ("sd21", 10, 1024, L_TEXT, 64), ("sd21", 20, 256, L_TEXT, 64),
    ("sd21", 20, 64, L_TEXT, 64),
    ("sdxl", 10, 4096, L_TEXT, 64), ("sdxl", 20, 1024, L_TEXT, 64),
    ("mmdit-long", 24, 4608, 4608, 128),
]
QUICK_CASES = [CASES[0], CASES[4], CASES[8]]
MODES = ("fwd", "bwd", "fwd+bwd")
CONCEPT_COLUMNS = [5, 6]  # e.g. "a photo of {Van Gogh}": two word pieces


def make_case(heads, n, l, d, dtype, device, batch=1):
    g = torch.Generator(device="cpu").manual_seed(0)
    # diffusers' layout: [B, seq, H, D] memory viewed as [B, H, seq, D]
    q = torch.randn(batch, n, heads, d, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(batch, l, heads, d, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(batch, l, heads, d, generator=g).to(device, dtype).transpose(1, 2)
    weights = torch.zeros(batch, l, device=device)
    weights[:, [c for c in CONCEPT_COLUMNS if c < l]] = 1.0
    return q, k, v, weights


def provider_fn(name, q, k, v, weights):
    """A closure returning (out, score or None) for one provider."""
    if name == "fused":
        return lambda: cross_attention(q, k, v, concept_weights=weights, backend="triton")
    if name == "sdpa":
        return lambda: (F.scaled_dot_product_attention(q, k, v), None)
    columns = weights[0].nonzero().flatten()

    def materialising():
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        score = probs[..., columns].float().square().sum(-1)
        return probs @ v, score
    return materialising


def loss_of(out, score):
    loss = out.float().square().mean()
    return loss if score is None else loss + score.sum()


def mode_fn(provider, mode, q, k, v, weights):
    fn = provider_fn(provider, *(t.requires_grad_(mode != "fwd") for t in (q, k, v)), weights)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
        return run
    if mode == "fwd+bwd":
        return lambda: loss_of(*fn()).backward()
    out, score = fn()
    loss = loss_of(out, score)
    return lambda: loss.backward(retain_graph=True)


def traffic(heads, n, l, d, dtype, mode):
    """Compulsory bytes and flops of one call (batch 1)."""
    elt = torch.finfo(dtype).bits // 8
    fwd_bytes = elt * heads * d * (2 * n + 2 * l)
    bwd_bytes = elt * heads * d * (4 * n + 4 * l)  # read q k v o dO, write dq dk dv (approx.)
    fwd_flops = 4 * heads * n * l * d
    b = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
    f = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}[mode]
    return b, f


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="3 shapes, fewer repeats, no long case")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (3 if args.quick else (20 if device.type == "cuda" else 5))
    providers = ["fused", "materialising", "sdpa"] if device.type == "cuda" else ["materialising", "sdpa"]
    cases = QUICK_CASES if args.quick else CASES
    if device.type == "cpu" and not args.quick:
        # 24 heads of a 4608 x 4608 map would take minutes per call on a 2-core CPU.
        cases = [c if c[0] != "mmdit-long" else (c[0], 2, *c[2:]) for c in cases]

    rows = []
    for case in cases:
        model, heads, n, l, d = case
        for provider in providers:
            for mode in MODES:
                inputs = make_case(heads, n, l, d, dtype, device)
                fn = mode_fn(provider, mode, *inputs)
                ms = time_ms(fn, device, repeats)
                peak = peak_memory_mib(fn, device)
                nbytes, flops = traffic(heads, n, l, d, dtype, mode)
                map_mib = 0.0 if provider != "materialising" else heads * n * l * torch.finfo(dtype).bits / 8 / 2**20
                rows.append(dict(model=model, heads=heads, N=n, L=l, D=d, provider=provider, mode=mode,
                                 ms=ms, GBps=nbytes / ms / 1e6, TFLOPs=flops / ms / 1e9, peak_MiB=peak,
                                 attn_map_MiB=map_mib))
                print_table_row(rows[-1])

    print()
    print_table(rows, ["model", "heads", "N", "L", "D", "provider", "mode", "ms", "GBps", "TFLOPs", "peak_MiB",
                       "attn_map_MiB"])
    out = args.out or RESULTS / f"kernels_{device_tag(device)}{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, {"benchmark": "concept attention kernels", "machine": machine_info(),
                            "dtype": str(dtype), "batch": 1, "repeats": repeats, "concept_columns": CONCEPT_COLUMNS,
                            "memory_method": "torch.cuda peak allocated" if device.type == "cuda"
                            else "resident-set high-water mark above the start (see bench/common.py)",
                            "rows": rows})
    plot(rows, out.with_suffix(".png"), f"{device_tag(device)}, {dtype}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def print_table_row(row):
    print("  ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["model"], r["heads"], r["N"], r["L"], r["D"]) for r in rows}, key=lambda s: (s[0], -s[2]))
    providers = sorted({r["provider"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    panels = ((axes[0], "ms", "fwd+bwd time (ms, log)"), (axes[1], "peak_MiB", "fwd+bwd peak memory (MiB, log)"))
    for ax, key, label in panels:
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = [next((r[key] for r in rows if (r["model"], r["heads"], r["N"], r["L"], r["D"]) == s
                            and r["provider"] == provider and r["mode"] == "fwd+bwd"), float("nan")) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=provider)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels([f"{m}\nH{h} N{n}\nL{l} D{d}" for m, h, n, l, d in shapes], fontsize=7)
        if any(v == v and v > 0 for r in rows for v in [r[key]]):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Concept attention, batch 1 ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
