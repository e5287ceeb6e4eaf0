"""Host cost of one fused-attention call: Python, allocations, autograd, launches.

Modes (both at SD 2.1's largest cross-attention shape [2, 5, 4096, 77, 64], diffusers' layout,
concept weights on):
  cpu   (default without CUDA) the Triton launch itself is replaced by a no-op (JITFunction.run
        patched), so the figure is fmn's own host path on any CPU: checks, plan lookup,
        allocations, autograd, argument packing. The plan is that of an H200 (sm90, 132 SMs).
        glibc's mmap and trim thresholds are raised so that freed blocks are reused, as CUDA's
        caching allocator does (otherwise each call maps and unmaps fresh pages).
  cuda  real launches: CPU time per call (perf_counter, no synchronisation, i.e. what the host
        spends issuing the call) and GPU time per call (CUDA events around a loop of calls).
Calls timed: forward without grad (inference), forward with grad (the autograd Function), the
custom op used under torch.compile (for comparison), backward through autograd (torch.autograd.grad
of out and score), and the op's backward function alone.
Host times: the fastest of repeated loops; GPU times: the median.
Writes bench/results/host_<device>.json and .png (or --out).

    python bench/bench_host.py [--device cuda] [--dtype float16] [--iters 2000] [--out DIR/host.json]
"""
import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_tag, machine_info, print_table, write_json_atomic  # noqa: E402

SHAPE = ("sd21-64px", 2, 5, 4096, 77, 64)
GOALS_US = {"fwd": 30.0, "bwd": 60.0}


def no_op_launches():
    """Replaces Triton's launch with a counter; returns the counter (a one-item list)."""
    from triton.runtime import jit

    count = [0]

    def run(self, *args, grid, warmup, **kwargs):
        count[0] += 1

    jit.JITFunction.run = run
    return count


def make_inputs(device, dtype):
    _, B, H, N, L, D = SHAPE
    q = torch.randn(B, N, H, D, device=device).to(dtype).transpose(1, 2)
    kv = torch.randn(B, L, 2, H, D, device=device).to(dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    w = torch.zeros(B, L, device=device)
    w[:, 5:7] = 1
    return q, k, v, w


def calls(q, k, v, w):
    """name -> (group, zero-argument callable) for every host path timed."""
    from fmn_kernels import cross_attention
    from fmn_kernels.ops import cross_attention as ops

    scale = q.shape[-1] ** -0.5
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out, score = cross_attention(qg, kg, vg, concept_weights=w, backend="triton")
    dout, dscore = torch.ones_like(out), torch.ones_like(score)
    _, score_f, lse = ops.forward(q, k, v, w, None, None, scale)

    def fwd_no_grad():
        with torch.no_grad():
            cross_attention(q, k, v, concept_weights=w, backend="triton")

    return {
        "fwd, no grad (inference)": ("fwd", fwd_no_grad),
        "fwd, with grad (autograd.Function)": ("fwd", lambda: cross_attention(qg, kg, vg, concept_weights=w,
                                                                               backend="triton")),
        "fwd, custom op (torch.compile's path, eager)": ("fwd", lambda: ops.concept_attention_fwd(
            q, k, v, w, None, None, scale, 0, ops.LONG_THRESHOLD)),
        "bwd, torch.autograd.grad": ("bwd", lambda: torch.autograd.grad((out, score), (qg, kg, vg), (dout, dscore),
                                                                        retain_graph=True)),
        "bwd, ops.backward alone": ("bwd", lambda: ops.backward(q, k, v, out.detach(), score_f, lse, w, None, None,
                                                                dout, dscore, scale)),
    }


def time_cpu_us(fn, iters, repeats):
    """Fastest of `repeats` loops, mean host time per call in microseconds (the minimum: on a
    shared machine other processes only ever add time)."""
    for _ in range(20):
        fn()
    loops = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        loops.append((time.perf_counter() - start) / iters * 1e6)
    return min(loops)


def time_gpu_us(fn, iters, repeats):
    """Median over loops of the GPU time per call (CUDA events around `iters` calls), microseconds."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        loops.append(start.elapsed_time(end) / iters * 1e3)
    return statistics.median(loops)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=None, help="calls per timed loop (default 2000 cpu, 200 cuda)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    iters = args.iters or (2000 if device.type == "cpu" else 200)
    torch.manual_seed(0)
    if device.type == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)
        from fmn_kernels.ops import cross_attention as ops  # kernels decorated as compiled JIT functions

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks from the heap, not fresh mappings
        libc.mallopt(-1, 512 * 2**20)  # M_TRIM_THRESHOLD: freed blocks kept for reuse
        launches = no_op_launches()
        ops._DEVICE_INFO[torch.device("cpu")] = ("sm90", 132)  # plan as on an H200
        import fmn_kernels.api
        fmn_kernels.api.TRITON_INTERPRETING = True  # lets cross_attention take CPU tensors to Triton (read at import)
    else:
        launches = None

    q, k, v, w = make_inputs(device, dtype)
    rows = []
    for name, (group, fn) in calls(q, k, v, w).items():
        before = launches[0] if launches else 0
        fn()
        row = dict(call=name, group=group, launches=(launches[0] - before) if launches else None,
                   host_us=time_cpu_us(fn, iters, args.repeats))
        if device.type == "cuda":
            row["gpu_us"] = time_gpu_us(fn, iters, args.repeats)
        row["goal_us"] = GOALS_US[group]
        rows.append(row)
        print(f"{name}: {row['host_us']:.1f} us host" + (f", {row['gpu_us']:.1f} us GPU" if "gpu_us" in row else ""),
              flush=True)
    if device.type == "cuda":
        import torch.nn.functional as F

        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        sdpa_out = F.scaled_dot_product_attention(qg, kg, vg)
        for name, group, fn in (("sdpa fwd, no grad", "fwd", lambda: F.scaled_dot_product_attention(q, k, v)),
                                ("sdpa bwd, torch.autograd.grad", "bwd", lambda: torch.autograd.grad(
                                    sdpa_out, (qg, kg, vg), torch.ones_like(sdpa_out), retain_graph=True))):
            rows.append(dict(call=name, group=group, launches=None, host_us=time_cpu_us(fn, iters, args.repeats),
                             gpu_us=time_gpu_us(fn, iters, args.repeats), goal_us=GOALS_US[group]))
    print()
    print_table(rows, ["call", "launches", "host_us"] + (["gpu_us"] if device.type == "cuda" else []) + ["goal_us"])
    out = args.out or RESULTS / f"host_{device_tag(device)}.json"
    payload = dict(benchmark="fused attention host path per call", machine=machine_info(), dtype=str(dtype),
                   shape=dict(zip(("name", "B", "H", "N", "L", "D"), SHAPE)), concept_weights=True,
                   mode="Triton launch replaced by a no-op (plan of sm90, 132 SMs)" if device.type == "cpu"
                   else "real launches; host_us = CPU time per call without sync, gpu_us = CUDA events",
                   iters=iters, repeats=args.repeats, torch_threads=torch.get_num_threads(),
                   load_average_1_5_15=list(os.getloadavg()), rows=rows)
    write_json_atomic(out, payload)
    try:
        plot(rows, out.with_suffix(".png"), f"{device_tag(device)}, {dtype}, {SHAPE[0]}")
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {out} (matplotlib not installed: no plot)")


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    names = [r["call"] for r in rows]
    ax.barh(names, [r["host_us"] for r in rows], label="host us per call")
    if any("gpu_us" in r for r in rows):
        ax.barh(names, [r.get("gpu_us", 0) for r in rows], height=0.35, label="GPU us per call")
    for i, r in enumerate(rows):
        ax.plot([r["goal_us"]] * 2, [i - 0.4, i + 0.4], "k--", lw=1)
    ax.set_xlabel("microseconds per call (dashed: goal)")
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(f"Fused attention host path ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
