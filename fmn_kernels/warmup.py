"""Compile ahead of a run the kernel variants a model family needs, into Triton's cache.

    python -m fmn_kernels.warmup [--family sd1|sd2|sdxl|sd3|flux|all] [--dtype bfloat16 ...]

For each attention call shape of the family (native resolution, diffusers' layout; one head is
enough: Triton specialises on the sequence lengths, strides and constexprs, not on the batch or
head count) it runs the forward and both backward modes the trainer uses (the attention loss alone:
no dO; and with dO from later layers), with concept weights. It prints the number of compiled
variants (distinct kernels x constexpr sets) and the time taken; later processes load them from
Triton's on-disk cache.
"""
import argparse
import sys
import time

import torch

from .ops import cross_attention as ops
from .utils import triton_interpreting

L_TEXT = 77
# family -> [(N, L, D)]: cross-attention (SD UNets, L = 77 text tokens) or joint attention (MM-DiT).
FAMILIES = {
    "sd1": [(4096, L_TEXT, 40), (1024, L_TEXT, 80), (256, L_TEXT, 160), (64, L_TEXT, 160)],
    "sd2": [(4096, L_TEXT, 64), (1024, L_TEXT, 64), (256, L_TEXT, 64), (64, L_TEXT, 64)],
    "sdxl": [(4096, L_TEXT, 64), (1024, L_TEXT, 64)],
    "sd3": [(4429, 4429, 64)],     # SD3.5: 4096 image + 333 text tokens (77 CLIP + 256 T5)
    "flux": [(4608, 4608, 128)],   # FLUX.1: 4096 image + 512 text tokens
}


def warm(family, dtype, device, max_n=None, log=print):
    """Runs every call of the family once; returns the set of variants compiled or reused."""
    variants = set()
    for N, L, D in FAMILIES[family]:
        if max_n:
            N, L = min(N, max_n), min(L, max_n)
        q = torch.randn(1, N, 1, D, device=device).to(dtype).transpose(1, 2)
        kv = torch.randn(1, L, 2, 1, D, device=device).to(dtype)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        w = torch.zeros(1, L, device=device)
        w[:, 5:7] = 1
        scale = D ** -0.5
        out, score, lse = ops.forward(q, k, v, w, None, None, scale)
        for dout in (None, torch.randn_like(out)):
            ops.backward(q, k, v, out, score, lse, w, None, None, dout, torch.ones_like(score), scale)
        log(f"{family} {dtype} N={N} L={L} D={D}: done")
    for launcher in ops.planned_launchers():
        if launcher.consts is not None:
            variants.add((launcher.kernel.__name__ if hasattr(launcher.kernel, "__name__") else launcher.name,
                          tuple(sorted(launcher.consts.items()))))
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fmn_kernels.warmup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="all", choices=sorted(FAMILIES) + ["all"])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-n", type=int, help=argparse.SUPPRESS)  # tests: cap N, L under the interpreter
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() or triton_interpreting()):
        print("warmup needs a CUDA GPU (nothing to compile for)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu")
    families = sorted(FAMILIES) if args.family == "all" else [args.family]
    start = time.perf_counter()
    variants = set()
    for family in families:
        for name in args.dtype:
            ops.clear_plans()
            variants |= warm(family, getattr(torch, name), device, args.max_n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_kernel = {}
    for kernel, _ in variants:
        per_kernel[kernel] = per_kernel.get(kernel, 0) + 1
    print(f"{len(variants)} kernel variants for {', '.join(families)} ({', '.join(args.dtype)}) in "
          f"{time.perf_counter() - start:.1f} s: " + ", ".join(f"{k} {n}" for k, n in sorted(per_kernel.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
