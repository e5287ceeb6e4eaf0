"""One Forget-Me-Not attention step on the SD 2.1-base UNet: fused processors vs materialising.

A UNet2DConditionModel with SD 2.1-base's architecture (random weights), batch 1, 64x64 latents,
77 text tokens of width 1024, concept "cat" of "a photo of a cat" (column 5). One step is:
forward with every cross-attention layer's concept score, L = sqrt(sum of scores), backward into
every UNet parameter (the paper's default: whole UNet trainable). Two variants:
- fused: fmn.concept_scores (fmn_kernels.cross_attention; Triton on CUDA, the PyTorch reference
  on a CPU, which itself materialises each layer's map, so the CPU shows little difference);
- materialising: fmn.testing.MaterializingCrossAttnProcessor, as the authors' code: diffusers'
  classic [B*H, N, 77] softmax maps kept, concept columns selected, L2 norm.

Peak memory: CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats ("extra" is
above the memory allocated before the step, i.e. weights excluded). CPU: the process's resident
set high-water mark (VmHWM in /proc/self/status) after resetting it through /proc/self/clear_refs
and returning freed heap to the OS with malloc_trim; "extra" is VmHWM minus VmRSS before the step.
Where clear_refs cannot be written, ru_maxrss growth is used (NaN when it does not grow).
The first call of each variant is the memory measurement and the first warm-up.

    python bench/bench_unet.py --quick           # CPU: 3 calls per variant
    python bench/bench_unet.py --dtype bfloat16  # on a GPU
Writes bench/results/unet_<device>.json and .png.
"""
import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, SD21_BASE_UNET, device_tag, machine_info, print_table, proc_status_kib,  # noqa: E402
                    reset_peak_rss, write_json_atomic)

from diffusers import UNet2DConditionModel  # noqa: E402

import fmn  # noqa: E402
from fmn.processors.attention import cross_attention_layers  # noqa: E402
from fmn.processors.spans import concept_token_mask  # noqa: E402
from fmn.testing import MaterializingCrossAttnProcessor, set_cross_attention_processor  # noqa: E402
from fmn.processors.tokenizer import clip_tokenizer  # noqa: E402

PROMPT, CONCEPT = "a photo of a cat", "cat"


def fused_step(unet, inputs, mask, backend):
    with fmn.concept_scores(unet, mask, backend=backend) as rec:
        unet(**inputs)
        loss = rec.loss()
    loss.backward()
    return loss.item()


def materialising_step(unet, inputs, mask, backend=None):
    oracle = MaterializingCrossAttnProcessor(concept_mask=mask)
    originals = set_cross_attention_processor(unet, oracle)
    try:
        unet(**inputs)
        loss = oracle.loss()
    finally:
        for name, module in unet.named_modules():
            if name in originals:
                module.set_processor(originals[name])
    loss.backward()
    return loss.item()


VARIANTS = {"fused": fused_step, "materialising": materialising_step}


def measure_peak(fn, device):
    """(result of fn(), extra MiB above the state before, total MiB at the peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return result, (peak - before) / 2**20, peak / 2**20
    if reset_peak_rss():
        before = proc_status_kib("VmRSS")
        result = fn()
        peak = proc_status_kib("VmHWM")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak <= before:
            return result, float("nan"), float("nan")
    return result, (peak - before) / 1024, peak / 1024


def timed_ms(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def alternating_times(calls, device, repeats):
    """{variant: [ms per call]}: rounds alternate the variants (and their order) so that load from
    other processes on a shared machine hits all alike."""
    times = {variant: [] for variant in calls}
    for round_ in range(repeats):
        for variant in (list(calls) if round_ % 2 == 0 else list(calls)[::-1]):
            times[variant].append(timed_ms(calls[variant], device))
    return times


def result_rows(measured, times):
    """One row per variant: median and all times, peak memory above the weights and in total, loss."""
    return [{"variant": v, "ms_median": statistics.median(times[v]), "ms_all": times[v], "peak_extra_mib": extra,
             "peak_total_mib": total, "loss": loss} for v, (loss, extra, total) in measured.items()]


def memory_method(device):
    return ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if device.type == "cuda"
            else "VmHWM after /proc/self/clear_refs reset and malloc_trim; extra = VmHWM - VmRSS before")


def layer_shapes(unet, batch):
    """[B, H, N, L, D] of every cross-attention layer, N at the 64x64 latent."""
    shapes = []
    side = {0: 64, 1: 32, 2: 16, 3: 8}
    for name, module in cross_attention_layers(unet):
        parts = name.split(".")
        level = 3 if parts[0] == "mid_block" else int(parts[1]) if parts[0] == "down_blocks" else 3 - int(parts[1])
        shapes.append({"layer": name, "shape": [batch, module.heads, side[level] ** 2, 77,
                                                module.inner_dim // module.heads]})
    return shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                        help="fmn_kernels backend of the fused variant")
    parser.add_argument("--quick", action="store_true", help="1 warm-up (the memory call) and 2 timed calls")
    parser.add_argument("--warmup", type=int, default=None, help="calls before timing, incl. the memory call")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5 if device.type == "cpu" else 20)
    backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "reference")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_BASE_UNET).to(device).train()
    if dtype != torch.float32:
        unet.to(dtype)
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 64, 64, generator=g).to(device, dtype),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 77, 1024, generator=g).to(device, dtype))
    mask = concept_token_mask(clip_tokenizer(pad_token="!"), [PROMPT], [CONCEPT]).to(device)
    shapes = layer_shapes(unet, 1)
    n_probs = sum(s["shape"][0] * s["shape"][1] * s["shape"][2] * s["shape"][3] for s in shapes)
    print(f"SD 2.1-base UNet, {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, {device} "
          f"{args.dtype}, fused backend {backend}; {len(shapes)} cross-attention layers, "
          f"{n_probs / 1e6:.1f} M probabilities per call")

    def make_call(step):
        def call():
            unet.zero_grad(set_to_none=True)
            return step(unet, inputs, mask, backend)
        return call
    load_start = os.getloadavg()
    calls = {variant: make_call(step) for variant, step in VARIANTS.items()}
    measured = {}
    for variant, call in calls.items():
        unet.zero_grad(set_to_none=True)  # the previous call's gradients must not count as "before"
        measured[variant] = measure_peak(call, device)
    for _ in range(warmup - 1):
        for call in calls.values():
            call()
    times = alternating_times(calls, device, repeats)
    unet.zero_grad(set_to_none=True)
    load_end = os.getloadavg()
    rows = result_rows(measured, times)

    print_table(rows, ["variant", "ms_median", "peak_extra_mib", "peak_total_mib", "loss"])
    rel = abs(rows[0]["loss"] - rows[1]["loss"]) / abs(rows[1]["loss"])
    print(f"loss relative difference fused vs materialising: {rel:.2e}")

    tag = device_tag(device)
    out = args.out or RESULTS / f"unet_{tag}.json"
    payload = {
        "benchmark": "SD 2.1-base UNet, one forward+backward with the Forget-Me-Not attention loss",
        "machine": machine_info(), "device": tag, "dtype": args.dtype, "fused_backend": backend,
        "unet_config": SD21_BASE_UNET, "trainable": "all UNet parameters",
        "inputs": {"sample": [1, 4, 64, 64], "encoder_hidden_states": [1, 77, 1024], "prompt": PROMPT,
                   "concept": CONCEPT, "concept_columns": torch.nonzero(mask[0]).flatten().tolist()},
        "cross_attention_layers": shapes, "probabilities_per_call": n_probs,
        "warmup": warmup, "repeats": repeats,
        "memory_method": memory_method(device),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "results": rows, "loss_relative_difference": rel,
    }
    if device.type == "cpu":
        payload["note"] = ("On a CPU the fused variant runs fmn_kernels' PyTorch reference, which materialises each "
                           "layer's map too (plus a few elementwise passes for the score), so time and memory are "
                           "close to the materialising variant by construction; the fused kernels' savings need a GPU. "
                           "CPU times vary with the machine's load (see load_average).")
    write_json_atomic(out, payload)
    plot(rows, out.with_suffix(".png"), f"SD 2.1-base UNet fwd+bwd, batch 1, {args.dtype}, {tag}")
    print(f"wrote {out} and {out.with_suffix('.png').name}")


def plot(rows, path, title, width=8):
    """Bars of time per step and peak memory per variant (green fused, grey materialising, blue SDPA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.5))
    for ax, key, label in ((axes[0], "ms_median", "time per step (ms)"),
                           (axes[1], "peak_extra_mib", "peak memory above weights (MiB)")):
        bars = ax.bar(names, [r[key] for r in rows], color=["tab:green", "tab:gray", "tab:blue"][:len(rows)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
