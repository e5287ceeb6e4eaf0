"""Tiles from measurement: time candidate tiles per (kernel, precision, head dim, shape class) on the
present GPU and write the winners for configs.py to take.

    python -m fmn_kernels.tune [--budget-s 140] [--out bench/results/tune_<gpu>.json] [--only KERNEL ...]
    python -m fmn_kernels.tune --dry-run --out /tmp/tune.json     # tiny shapes, under TRITON_INTERPRET=1

Each candidate is launched through the library's own host code with that tile forced (so the same
kernels, constexprs and grids as a real call). Kept only when it compiled as asked (no fallback to a
smaller tile), within shared memory, with 0 spill bytes (Triton's compiled kernel reports them:
the same gate as fmn_kernels.aot, on the real compiler). Timing: CUDA events around repeated calls
after a warm-up, median of loops (the forward for forward kernels, the whole backward for backward
ones: only the tuned kernel's tile differs). Sweeps run in order of importance (FLUX, then SD3.5,
then SD shapes), each winner used by the sweeps after it; --budget-s stops before the next
candidate once the time is spent and writes what it has. Results: every candidate's time and
resources, and the winners, in bench/results/tune_<gpu>.json, which configs.py reads at import.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from .ops import configs
from .ops import cross_attention as ops
from .utils import triton_interpreting

T = configs.Tile
# (kernel, dtype, (B, H, N, L, D), long_threshold, candidates); the table's tile is always tried first.
# Around the winners measured on an H200 (docs/kernel-tuning.md) and Triton's tutorial shapes
# (dK/dV 32 x 128 with 3-5 stages; dQ 128 x 32 or 64 x 64; forward 128 x 128 or 128 x 64 with 3-4
# stages). At D=128 four warps cannot hold dK and dV (ptxas, sm_90: 32 x 128 x 4 warps spilled 1.7 KB)
# nor the forward's 128-row tiles, so the D=128 lists keep 8 warps there. FLUX first: its winners
# matter most. 34 candidates + 8 table tiles, about 1-3 s each on an H200 (compile + timing).
SWEEPS = [
    ("dkdv_long", torch.bfloat16, (1, 24, 4608, 4608, 128), 1024,
     [T(32, 128, 8, 3), T(32, 128, 8, 4), T(32, 128, 8, 5), T(16, 128, 8, 3), T(16, 128, 8, 4),
      T(64, 64, 8, 3), T(64, 128, 8, 2)]),
    ("dq_long", torch.bfloat16, (1, 24, 4608, 4608, 128), 1024,
     [T(64, 64, 4, 2), T(64, 64, 4, 3), T(64, 64, 4, 4), T(64, 64, 8, 3), T(128, 32, 8, 3),
      T(128, 64, 8, 2), T(128, 64, 8, 3)]),
    ("fwd_long", torch.bfloat16, (1, 24, 4608, 4608, 128), 1024,
     [T(128, 128, 8, 3), T(128, 64, 8, 4), T(128, 64, 8, 5), T(128, 32, 8, 4), T(64, 64, 4, 4)]),
    ("dkdv_long", torch.bfloat16, (1, 38, 4429, 4429, 64), 1024,
     [T(32, 128, 4, 3), T(32, 128, 4, 5), T(32, 128, 8, 3), T(64, 128, 8, 3)]),
    ("dq_long", torch.bfloat16, (1, 38, 4429, 4429, 64), 1024,
     [T(64, 64, 4, 2), T(64, 64, 4, 3), T(128, 32, 4, 3), T(128, 64, 8, 3)]),
    ("fwd_long", torch.bfloat16, (1, 38, 4429, 4429, 64), 1024,
     [T(128, 32, 4, 4), T(128, 64, 4, 3), T(128, 64, 4, 4), T(128, 128, 8, 3)]),
    ("bwd1", torch.bfloat16, (2, 5, 4096, 77, 64), 1024, [T(16, 0, 4, 1), T(32, 0, 8, 1)]),
    ("fwd1", torch.bfloat16, (2, 5, 4096, 77, 64), 1024, [T(32, 0, 4, 1), T(64, 0, 4, 1), T(64, 0, 8, 1)]),
]
# Under the interpreter (CI): tiny shapes, two candidates, long path forced by a low threshold.
DRY_SWEEPS = [
    ("fwd_long", torch.float16, (1, 1, 40, 140, 64), 16, [T(32, 32, 4, 1)]),
    ("dkdv_long", torch.float16, (1, 1, 40, 140, 64), 16, [T(16, 16, 4, 1)]),
]
BACKWARD = ("bwd1", "dkdv", "dkdv_long", "dq", "dq_long")


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200' (the tune file's name)."""
    name = name.lower().replace("nvidia", "")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split()) or "gpu"


def make_call(kernel, dtype, shape, long_threshold, device):
    """A zero-argument callable running the forward (forward kernels) or the backward, diffusers'
    layout, concept weights and a key mask as the trainer passes them."""
    B, H, N, L, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g).to(device, dtype).transpose(1, 2)
    kv = torch.randn(B, L, 2, H, D, generator=g).to(device, dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    w = torch.zeros(B, L, device=device)
    w[:, 5:7] = 1
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    scale = D ** -0.5
    if kernel not in BACKWARD:
        return lambda: ops.forward(q, k, v, w, None, valid, scale, long_threshold)
    out, score, lse = ops.forward(q, k, v, w, None, valid, scale, long_threshold)
    dout, dscore = torch.randn_like(out), torch.randn_like(score)
    return lambda: ops.backward(q, k, v, out, score, lse, w, None, valid, dout, dscore, scale, 0, long_threshold)


def table_block_d(head_dim):
    """The table's head-dim key: the padded head dim, at least 64."""
    return max(64, triton.next_power_of_2(head_dim))


def launcher_of(kernel):
    """The Launcher that ran `kernel` in the last planned call (plans are cleared per candidate)."""
    return next((launcher for launcher in ops.planned_launchers() if launcher.name == kernel), None)


def time_ms(fn, device, loops=5, min_calls=3):
    """Median over loops of the time per call (CUDA events on a GPU, perf_counter otherwise)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        calls = max(min_calls, min(50, int(0.02 / max(time.perf_counter() - start, 1e-6))))
        results = []
        for _ in range(loops):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            results.append(begin.elapsed_time(end) / calls)
        return statistics.median(results)
    results = []
    for _ in range(max(1, loops // 2)):
        start = time.perf_counter()
        fn()
        results.append((time.perf_counter() - start) * 1e3)
    return statistics.median(results)


def measure(kernel, dtype, shape, long_threshold, tile, device, arch):
    """One candidate: its time and compiled resources, or why it was rejected."""
    key = (kernel, ops.precision_class(dtype), table_block_d(shape[4]), arch)
    previous = configs.TUNED.get(key)
    configs.TUNED[key] = tile
    ops.clear_plans()
    row = dict(tile=list(tile))
    try:
        fn = make_call(kernel, dtype, shape, long_threshold, device)
        fn()  # compiles
        launcher = launcher_of(kernel)
        if launcher is None or launcher.tile != tile:
            row["error"] = f"not launched as asked (took {None if launcher is None else list(launcher.tile)})"
            return row
        compiled = launcher.compiled
        if compiled is not None and hasattr(compiled, "n_spills"):
            row.update(regs=compiled.n_regs, spills=compiled.n_spills, shared=compiled.metadata.shared)
            if compiled.n_spills:
                row["error"] = f"spills {compiled.n_spills} B"
                return row
        row["ms"] = time_ms(fn, device)
    except Exception as e:  # recorded; the sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        if previous is None:
            configs.TUNED.pop(key, None)
        else:
            configs.TUNED[key] = previous
    return row


def sweep(sweeps, device, arch, budget_s, log=print):
    """Runs the sweeps in order until the budget is spent; returns (results, winners)."""
    start = time.perf_counter()
    results, winners = [], []
    for kernel, dtype, shape, long_threshold, extra in sweeps:
        precision = ops.precision_class(dtype)
        block_d = table_block_d(shape[4])
        base = configs.table_tile(kernel, precision, block_d, arch)
        candidates = [base] + [t for t in extra if t != base]
        rows = []
        for tile in candidates:
            if time.perf_counter() - start > budget_s:
                log(f"budget of {budget_s:.0f} s spent: stopping before {kernel} {list(tile)}")
                break
            row = measure(kernel, dtype, shape, long_threshold, tile, device, arch)
            rows.append(row)
            log(f"{kernel} {precision} D{block_d} {list(shape)} {list(tile)}: "
                + (f"{row['ms']:.4f} ms" if "ms" in row else row.get("error", "?")))
        timed = [r for r in rows if "ms" in r]
        result = dict(kernel=kernel, precision=precision, block_d=block_d, arch=arch, dtype=str(dtype),
                      shape=list(shape), candidates=rows)
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            result["winner"] = best["tile"]
            winners.append(dict(kernel=kernel, precision=precision, block_d=block_d, arch=arch, tile=best["tile"],
                                ms=best["ms"], table_ms=rows[0].get("ms"), shape=list(shape)))
            configs.TUNED[(kernel, precision, block_d, arch)] = T(*best["tile"])  # later sweeps use it
        results.append(result)
        if time.perf_counter() - start > budget_s:
            break
    return results, winners, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fmn_kernels.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=140.0, help="stop starting candidates after this")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/tune_<gpu>.json)")
    parser.add_argument("--only", nargs="+", help="kernels to sweep (default all)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, two candidates (CI, interpreter)")
    args = parser.parse_args(argv)
    interpreting = triton_interpreting()
    if not (torch.cuda.is_available() or interpreting):
        print("tune needs a CUDA GPU (or TRITON_INTERPRET=1 with --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not interpreting else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "triton-interpreter"
    arch = ops.device_info(device)[0]
    sweeps = DRY_SWEEPS if args.dry_run else SWEEPS
    if args.only:
        sweeps = [s for s in sweeps if s[0] in args.only]
    saved = dict(configs.TUNED)
    configs.TUNED.clear()  # candidates are judged against the table, not an earlier tune file
    try:
        results, winners, elapsed = sweep(sweeps, device, arch, args.budget_s)
    finally:
        configs.TUNED.clear()
        configs.TUNED.update(saved)
        ops.clear_plans()

    out = args.out or configs.RESULTS / f"tune_{gpu_slug(gpu)}.json"
    payload = dict(gpu=gpu, arch=arch, capability=list(torch.cuda.get_device_capability(device))
                   if device.type == "cuda" else None, torch=torch.__version__, triton=triton.__version__,
                   dry_run=bool(args.dry_run or interpreting), elapsed_s=round(elapsed, 1), budget_s=args.budget_s,
                   complete=len(results) == len(sweeps) and all(len(r["candidates"]) for r in results),
                   timing="CUDA events, median of 5 loops" if device.type == "cuda" else "perf_counter (interpreter)",
                   winners=winners, results=results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"{len(winners)} winners in {elapsed:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
