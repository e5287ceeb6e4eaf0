"""SD 2.1-base UNet with fmn's processors: drop-in inference against diffusers' own, and one
Forget-Me-Not training step, fused against materialising.

A UNet2DConditionModel with SD 2.1-base's architecture (random weights from the config), 512 px
(64x64 latents), 77 text tokens of width 1024. Two parts, each variant side by side in one process:
- inference (batch 2, no_grad, eval): "diffusers" (the model's own processors, AttnProcessor2_0)
  against "fmn" (fmn.use_fused_attention installed, no concept: the calls go to the same SDPA, see
  fmn/processors/attention.py), on two copies of one UNet; goal fmn <= 1.02x diffusers, outputs bit-identical
  (both checked and stored);
- step (batch 1): forward with every cross-attention layer's concept score, L = sqrt(sum of
  scores), backward into every UNet parameter. "fused": fmn.concept_scores (Triton on CUDA, the
  PyTorch reference on a CPU, which materialises each layer's map itself); "materialising":
  fmn.testing.MaterializingCrossAttnProcessor, the authors' way ([B*H, N, 77] maps kept); "sdpa":
  the stock processors and a plain loss (mean of the output), the floor without any score.
A variant that raises is reported in the table and the JSON (status, error) and the others go on
(bench/common.py run_variants); the JSON is rewritten after each variant. Results name the SDPA
backends the stock attention ran (torch profiler) and the ones torch may pick.

Peak memory: CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats ("extra" is
above the memory allocated before the call, i.e. weights excluded). CPU: the resident set's
high-water mark (VmHWM) after a reset through /proc/self/clear_refs; "extra" is VmHWM minus VmRSS before.

    python bench/bench_unet.py --quick                      # H200: ~40 s (fp16)
    python bench/bench_unet.py --device cpu --resolution 128 --quick   # a CPU smoke run
Writes bench/results/unet_<device>.json and .png.
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, SD21_BASE_UNET, device_tag, machine_info, print_table, run_variants,  # noqa: E402
                    sdpa_backends, sdpa_settings, write_json_atomic)

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


def sdpa_step(unet, inputs, mask=None, backend=None):
    loss = unet(**inputs).sample.float().mean()
    loss.backward()
    return loss.item()


STEP_VARIANTS = {"fused": fused_step, "materialising": materialising_step, "sdpa": sdpa_step}


def memory_method(device):
    return ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if device.type == "cuda"
            else "VmHWM after /proc/self/clear_refs reset and malloc_trim; extra = VmHWM - VmRSS before")


def layer_shapes(unet, batch, latent=64):
    """[B, H, N, L, D] of every cross-attention layer, N at the latent side `latent`."""
    shapes = []
    side = {i: latent >> i for i in range(4)}
    for name, module in cross_attention_layers(unet):
        parts = name.split(".")
        level = 3 if parts[0] == "mid_block" else int(parts[1]) if parts[0] == "down_blocks" else 3 - int(parts[1])
        shapes.append({"layer": name, "shape": [batch, module.heads, side[level] ** 2, 77,
                                                module.inner_dim // module.heads]})
    return shapes


def build_unet(device, dtype):
    """SD 2.1-base's UNet with random weights, made on the device (fast), in dtype."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
    return unet.to(dtype)


def unet_inputs(batch, resolution, device, dtype):
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    return dict(sample=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
                timestep=torch.tensor([500] * batch, device=device),
                encoder_hidden_states=torch.randn(batch, 77, 1024, generator=g).to(device, dtype))


def inference_part(unet, args, device, dtype, repeats, save):
    """fmn's processors vs diffusers' on two copies of the UNet, no_grad: rows, ratio, identity check."""
    stock = unet.eval()
    ours = copy.deepcopy(stock)
    fmn.use_fused_attention(ours, backend=args.backend)
    inputs = unet_inputs(args.batch, args.resolution, device, dtype)

    def call(model):
        def run():
            with torch.no_grad():
                model(**inputs)
        return run
    calls = {"diffusers": call(stock), "fmn": call(ours)}
    with torch.no_grad():
        backends = {name: sdpa_backends(fn) for name, fn in calls.items()}
        a, b = stock(**inputs).sample, ours(**inputs).sample
    part = {"batch": args.batch, "sdpa_backends": backends,
            "outputs_bit_identical": bool(torch.equal(a, b)), "max_abs_difference": float((a - b).abs().max())}
    del a, b
    rows = run_variants(calls, device, repeats, lambda r: save({**part, "results": r}), warmup=2)
    times = {r["variant"]: r.get("ms_median") for r in rows}
    if times.get("fmn") and times.get("diffusers"):
        part["fmn_over_diffusers"] = times["fmn"] / times["diffusers"]
    del ours
    part["results"] = rows
    return part


def step_part(unet, args, device, dtype, repeats, backend, save):
    """One training step with the attention loss: fused vs materialising vs plain SDPA (batch 1)."""
    unet.train()
    inputs = unet_inputs(1, args.resolution, device, dtype)
    mask = concept_token_mask(clip_tokenizer(pad_token="!"), [PROMPT], [CONCEPT]).to(device)

    def make_call(step):
        def call():
            unet.zero_grad(set_to_none=True)
            return step(unet, inputs, mask, backend)
        return call
    calls = {variant: make_call(step) for variant, step in STEP_VARIANTS.items()}
    part = {"batch": 1, "fused_backend": backend, "shapes": layer_shapes(unet, 1, args.resolution // 8),
            "concept_columns": torch.nonzero(mask[0].cpu()).flatten().tolist(), "trainable": "all UNet parameters",
            "sdpa_backends": {"sdpa": sdpa_backends(calls["sdpa"])}}
    rows = run_variants(calls, device, repeats, lambda r: save({**part, "results": r}), warmup=2)
    unet.zero_grad(set_to_none=True)
    losses = {r["variant"]: r.get("result") for r in rows}
    if losses.get("fused") is not None and losses.get("materialising"):
        part["loss_relative_difference"] = abs(losses["fused"] - losses["materialising"]) / abs(losses["materialising"])
    ms = {r["variant"]: r.get("ms_median") for r in rows}
    for other in ("materialising", "sdpa"):
        if ms.get("fused") and ms.get(other):
            part[f"fused_over_{other}"] = ms["fused"] / ms[other]
    part["results"] = rows
    return part


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default float16 on CUDA, float32 on a CPU")
    parser.add_argument("--batch", type=int, default=2, help="inference batch (the step runs batch 1)")
    parser.add_argument("--resolution", type=int, default=512, help="pixels (latents: / 8)")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                        help="fmn_kernels backend of the fused step")
    parser.add_argument("--part", default="all", choices=["all", "inference", "step"])
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    gpu = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else ((20 if gpu else 2) if args.quick else (50 if gpu else 5))
    backend = args.backend if args.backend != "auto" else ("triton" if gpu else "reference")

    unet = build_unet(device, dtype)
    print(f"SD 2.1-base UNet, {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, {device} "
          f"{dtype}, {args.resolution} px; {len(cross_attention_layers(unet))} cross-attention layers", flush=True)
    tag = device_tag(device)
    out = args.out or RESULTS / f"unet_{tag}.json"
    payload = {
        "benchmark": "SD 2.1-base UNet: drop-in inference (fmn vs diffusers processors) and one training step "
                     "with the Forget-Me-Not attention loss (fused vs materialising vs SDPA without score)",
        "machine": machine_info(), "device": tag, "dtype": str(dtype).removeprefix("torch."),
        "resolution": args.resolution, "unet_config": SD21_BASE_UNET, "repeats": repeats,
        "sdpa_enabled": sdpa_settings(), "memory_method": memory_method(device),
        "goals": {"inference_fmn_over_diffusers": 1.02}, "load_average_start": os.getloadavg(),
    }

    def save(name):
        def write(part):
            payload[name] = part
            write_json_atomic(out, payload)
        return write
    columns = ["variant", "status", "ms_median", "peak_extra_mib", "peak_total_mib", "error"]
    if args.part in ("all", "inference"):
        part = inference_part(unet, args, device, dtype, repeats, save("inference"))
        save("inference")(part)
        print(f"\ninference, batch {args.batch}: fmn / diffusers = {part.get('fmn_over_diffusers', float('nan')):.3f} "
              f"(goal <= 1.02); outputs bit-identical: {part['outputs_bit_identical']}; "
              f"SDPA backends {part['sdpa_backends']}")
        print_table(part["results"], columns)
    if args.part in ("all", "step"):
        part = step_part(unet, args, device, dtype, max(2, repeats // 4), backend, save("step"))
        save("step")(part)
        print(f"\nstep, batch 1, fused backend {backend}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in part.items() if k.startswith("fused_over")))
        print_table(part["results"], columns + ["result"])
    payload["load_average_end"] = os.getloadavg()
    write_json_atomic(out, payload)
    rows = [dict(r, variant=f"{name}: {r['variant']}") for name in ("inference", "step") if name in payload
            for r in payload[name]["results"] if r.get("ms_median")]
    if rows:
        plot(rows, out.with_suffix(".png"), f"SD 2.1-base UNet, {args.resolution} px, {payload['dtype']}, {tag}",
             width=10)
    print(f"wrote {out}")


def plot(rows, path, title, width=8):
    """Bars of time per step and peak memory per variant (green fused, grey materialising, blue SDPA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.5))
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    for ax, key, label in ((axes[0], "ms_median", "time per step (ms)"),
                           (axes[1], "peak_extra_mib", "peak memory above weights (MiB)")):
        bars = ax.bar(names, [r.get(key) or 0 for r in rows],
                      color=[["tab:green", "tab:gray", "tab:blue"][i % 3] for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
