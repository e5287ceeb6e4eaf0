"""Concept attention kernels: fused vs materialising vs PyTorch SDPA, forward / backward / both.

Shapes: every distinct cross-attention shape of SD 1.5, SD 2.1-base (512 px) and SDXL (1024 px),
L = 77 text tokens, batch 1; long keys [1, 8, 1024, 4608, 128]; joint attention of FLUX.1
[1, 24, 4608, 4608, 128] and SD3.5-large [1, 38, 4429, 4429, 64] (4429: not a multiple of any block).
Providers:
  fused         fmn_kernels.cross_attention, Triton, with the concept score (GPU only: on CPU the
                Triton interpreter measures Python, not the kernel)
  materialising softmax map in memory, concept columns selected and squared (the authors' way)
  sdpa          torch.nn.functional.scaled_dot_product_attention, no score (the speed to match); the
                backend it dispatched to (flash / efficient / cudnn / math) is read off a profiler
                trace and recorded per shape
A variant that raises (e.g. cuDNN's SDPA backward at FLUX shapes in torch 2.11) is recorded with its
error in the table and JSON, and the benchmark goes on.
Graphed rows (mode "fwd+bwd graph", CUDA, the SD shapes with L = 77): each provider's forward and
backward captured once in a CUDA graph and replayed (fmn's training step runs under CUDA graphs by
default, and eager calls at these shapes are host-bound for every provider); --no-graph leaves them out.
Metrics: median ms, achieved GB/s (compulsory bytes: q, k, v, out [+ dout, dq, dk, dv]) and TFLOP/s
(4 N L D per head forward, 2.5x that backward), peak memory above the inputs in MiB.
Writes bench/results/kernels_<device>.json and .png.

    python bench/bench_kernels.py [--quick] [--dtype bfloat16] [--device cuda] [--out DIR/kernels.json]
                                  [--shapes sd21,flux-joint] [--no-graph]
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
    ("long-keys", 8, 1024, 4608, 128), ("flux-joint", 24, 4608, 4608, 128), ("sd35-joint", 38, 4429, 4429, 64),
]
LONG = ("long-keys", "flux-joint", "sd35-joint")
QUICK_CASES = [CASES[0], CASES[4], CASES[8]]
MODES = ("fwd", "bwd", "fwd+bwd")
GRAPH_MODE = "fwd+bwd graph"
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


def graphed_fn(provider, q, k, v, weights):
    """Forward + backward of one provider captured once in a CUDA graph (after warm-up calls on a
    side stream, as torch.cuda.graph's docs ask); returns the graph's replay."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    fn = provider_fn(provider, q, k, v, weights)

    def step():
        for t in (q, k, v):
            t.grad = None
        loss_of(*fn()).backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_of(*fn()).backward()
    return graph.replay


def sdpa_backend(q, k, v):
    """Which kernel F.scaled_dot_product_attention dispatched to, read off a profiler trace."""
    if q.device.type != "cuda":
        return "math (cpu)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, k, v)
    names = " ".join(e.name for e in prof.events()).lower()
    for key, name in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient")):
        if key in names:
            return name
    return "math"


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
    parser.add_argument("--repeats", type=int, default=None, help="do_bench rep = max(50, 10 x repeats) ms")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated models to keep, of {','.join(dict.fromkeys(c[0] for c in CASES))}")
    parser.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (3 if args.quick else 5)
    providers = ["fused", "sdpa", "materialising"] if device.type == "cuda" else ["materialising", "sdpa"]
    cases = QUICK_CASES if args.quick else CASES
    if args.shapes:
        keep = args.shapes.split(",")
        unknown = set(keep) - {c[0] for c in CASES}
        if unknown:
            parser.error(f"--shapes: unknown models {sorted(unknown)}")
        cases = [c for c in CASES if c[0] in keep]
    graph = device.type == "cuda" and not args.no_graph
    if device.type == "cpu" and not args.quick:
        # 24 heads of a 4608 x 4608 map would take minutes per call on a 2-core CPU.
        cases = [c if c[0] not in LONG else (c[0], 1, *c[2:]) for c in cases]

    rows = []
    for case in cases:
        model, heads, n, l, d = case
        try:
            backend = sdpa_backend(*make_case(heads, n, l, d, dtype, device)[:3])
        except Exception as e:  # noqa: BLE001 - recorded
            backend = f"error: {type(e).__name__}"
        modes = MODES + ((GRAPH_MODE,) if graph and model not in LONG else ())
        for provider in providers:
            for mode in modes:
                row = dict(model=model, heads=heads, N=n, L=l, D=d, provider=provider, mode=mode,
                           sdpa_backend=backend if provider == "sdpa" else "", error="")
                try:
                    inputs = make_case(heads, n, l, d, dtype, device)
                    if mode == GRAPH_MODE:
                        fn = graphed_fn(provider, *inputs)
                    else:
                        fn = mode_fn(provider, mode, *inputs)
                    ms = time_ms(fn, device, repeats)
                    peak = peak_memory_mib(fn, device) if mode != GRAPH_MODE else float("nan")  # graph pool
                    nbytes, flops = traffic(heads, n, l, d, dtype, mode.split()[0])
                    elt_bytes = torch.finfo(dtype).bits / 8
                    map_mib = 0.0 if provider != "materialising" else heads * n * l * elt_bytes / 2**20
                    row.update(ms=ms, GBps=nbytes / ms / 1e6, TFLOPs=flops / ms / 1e9, peak_MiB=peak,
                               attn_map_MiB=map_mib)
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest goes on
                    row.update(ms=float("nan"), GBps=float("nan"), TFLOPs=float("nan"), peak_MiB=float("nan"),
                               attn_map_MiB=float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print_table_row(rows[-1])
    rows += ratios(rows)

    print()
    print_table(rows, ["model", "heads", "N", "L", "D", "provider", "mode", "ms", "GBps", "TFLOPs", "peak_MiB",
                       "attn_map_MiB", "sdpa_backend", "error"])
    out = args.out or RESULTS / f"kernels_{device_tag(device)}{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, {"benchmark": "concept attention kernels", "machine": machine_info(),
                            "graph_mode": f"'{GRAPH_MODE}': fwd+bwd captured once in a CUDA graph, replays timed"
                            if graph else "off",
                            "dtype": str(dtype), "batch": 1, "repeats": repeats, "concept_columns": CONCEPT_COLUMNS,
                            "memory_method": "torch.cuda peak allocated" if device.type == "cuda"
                            else "resident-set high-water mark above the start (see bench/common.py)",
                            "rows": rows})
    try:
        plot(rows, out.with_suffix(".png"), f"{device_tag(device)}, {dtype}")
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:  # a bare GPU box (torch + triton only): the JSON holds every figure
        print(f"wrote {out} (matplotlib not installed: no plot)")


def ratios(rows):
    """fused / sdpa time per (shape, mode): the side-by-side figure the kernel goals are stated in."""
    out = []
    for row in rows:
        if row["provider"] != "fused":
            continue
        key = tuple(row[k] for k in ("model", "heads", "N", "L", "D", "mode"))
        sdpa = next((r for r in rows if r["provider"] == "sdpa"
                     and tuple(r[k] for k in ("model", "heads", "N", "L", "D", "mode")) == key), None)
        if sdpa is not None:
            out.append(dict({k: row[k] for k in ("model", "heads", "N", "L", "D", "mode")}, provider="fused/sdpa",
                            ms=row["ms"] / sdpa["ms"], sdpa_backend=sdpa["sdpa_backend"], error=""))
    return out


def print_table_row(row):
    print("  ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["model"], r["heads"], r["N"], r["L"], r["D"]) for r in rows}, key=lambda s: (s[0], -s[2]))
    providers = sorted({r["provider"] for r in rows if r["provider"] != "fused/sdpa"})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    panels = ((axes[0], "ms", "fwd+bwd time (ms, log)"), (axes[1], "peak_MiB", "fwd+bwd peak memory (MiB, log)"))
    for ax, key, label in panels:
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = [next((r.get(key, float("nan")) for r in rows
                            if (r["model"], r["heads"], r["N"], r["L"], r["D"]) == s
                            and r["provider"] == provider and r["mode"] == "fwd+bwd"), float("nan")) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=provider)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels([f"{m}\nH{h} N{n}\nL{l} D{d}" for m, h, n, l, d in shapes], fontsize=7)
        if any(v == v and v > 0 for r in rows for v in [r.get(key, float("nan"))]):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Concept attention, batch 1 ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
