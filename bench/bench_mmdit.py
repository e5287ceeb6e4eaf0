"""One Forget-Me-Not training step on FLUX.1-dev's blocks: fused processors vs materialising vs SDPA.

A FluxTransformer2DModel with FLUX.1-dev's block shapes (24 heads of 128, width 3072, T5 width
4096, guidance embedding; random weights) at a reduced layer count (default 1 double- and
1 single-stream block of FLUX.1-dev's 19 + 38) and resolution (default 256 px: 16x16 packed
latents = 256 image tokens, plus 512 T5 tokens = 768 joint tokens), batch 1. One step: forward,
the attention loss over the image rows of every joint layer (concept = 4 T5 columns), backward
into the text-side key/value projections (train="attn2-kv"). Variants:
- fused: fmn.concept_scores through fmn.mmdit_attention (fmn_kernels.cross_attention, backend
  "auto": Triton on CUDA; on a CPU the PyTorch reference, which itself materialises each layer's
  map in fp32, so the CPU shows little difference by construction);
- materialising: diffusers' stock processors with torch's SDPA replaced by an explicit fp32
  softmax that keeps every joint map (fmn.testing.MaterializedSDPA), the loss read from them: a
  plain-PyTorch FMN on MM-DiT;
- sdpa: the stock processors and a plain denoising-style loss (mean of the output): the floor
  (no concept scores at all), with SDPA limited to the flash / mem-efficient / math backends;
- sdpa-default: the same with torch's default backend choice, which on Hopper may pick cuDNN,
  whose backward fails at FLUX shapes in torch 2.11 (`mha_graph.execute(...).is_good()`,
  reported as an illegal memory access that poisons the CUDA context). It runs last: a variant
  that raises is reported (status, error) and the others keep their figures; the JSON is
  rewritten after each variant (bench/common.py run_variants). Results name the SDPA backends
  each stock variant ran (torch profiler).
Peak memory as in bench_unet.py (CPU: VmHWM above VmRSS before the step; CUDA: max allocated).

    python bench/bench_mmdit.py --quick                  # CPU, bf16, 256 px, 1 + 1 blocks
    python bench/bench_mmdit.py --resolution 1024 --double 2 --single 2 --quick   # H200: ~60 s
Writes bench/results/mmdit_<device>.json and .png. The full-size memory model (per-layer P of
B*H*N_joint^2 values) is printed and stored alongside.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import memory_method, plot  # noqa: E402
from common import (RESULTS, device_tag, machine_info, print_table, run_variants, sdpa_backends,  # noqa: E402
                    sdpa_settings, write_json_atomic)
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from diffusers import FluxTransformer2DModel  # noqa: E402

import fmn  # noqa: E402
from fmn.families.mmdit import image_ids  # noqa: E402
from fmn.testing import MaterializedSDPA  # noqa: E402

HEADS, HEAD_DIM, T5_WIDTH, POOLED = 24, 128, 4096, 768
CONCEPT_COLUMNS = [3, 4, 5, 6]


def flux_dev_blocks(double, single):
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                  joint_attention_dim=T5_WIDTH, pooled_projection_dim=POOLED,
                                  guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def make_inputs(resolution, text_len, device, dtype):
    side = resolution // 8  # VAE 8x, then 2x2 packing
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, (side // 2) ** 2, 64, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, text_len, T5_WIDTH, generator=g).to(device, dtype),
                pooled_projections=torch.randn(1, POOLED, generator=g).to(device, dtype),
                timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
                img_ids=image_ids(side, side, device), txt_ids=torch.zeros(text_len, 3, device=device),
                return_dict=False)


def fused_step(model, inputs, weights):
    with fmn.concept_scores(model, weights) as recorder:
        model(**inputs)
        loss = recorder.loss()
    loss.backward()
    return loss.item()


def materialising_step(model, inputs, weights):
    text_len, joint = weights.shape[1], None
    with MaterializedSDPA() as sdpa:
        model(**inputs)
    total = 0
    for probs in sdpa.probs:  # FLUX's joint layout: [text; image]
        joint = torch.cat([weights.float(), weights.new_zeros(1, probs.shape[-1] - text_len).float()], dim=1)
        total = total + (probs[:, :, text_len:].square() * joint[:, None, None, :]).sum()
    loss = total.sqrt()
    loss.backward()
    return loss.item()


def sdpa_step(model, inputs, weights):
    loss = model(**inputs)[0].float().mean()
    loss.backward()
    return loss.item()


NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_no_cudnn_step(model, inputs, weights):
    with sdpa_kernel(NO_CUDNN):
        return sdpa_step(model, inputs, weights)


# In order: the ones that may fail last.
VARIANTS = {"fused": fused_step, "materialising": materialising_step, "sdpa": sdpa_no_cudnn_step,
            "sdpa-default": sdpa_step}


def profiled_backends(call):
    """sdpa_backends(call), or why not (a profile that fails changes no figure)."""
    try:
        return sdpa_backends(call)
    except Exception as e:
        return f"not profiled: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def memory_model(batch=1, bytes_per_value=2):
    """Full size, batch 1, bf16: what a layer keeps for the backward beyond its inputs q, k, v (which
    any attention keeps): materialising, the joint probability map P (B*H*N^2 values; the output
    too, not counted); fused, the output O (B*H*N*D) and the fp32 log-sum-exp (B*H*N)."""
    rows = []
    for name, heads, head_dim, image, text, layers in (("FLUX.1-dev 1024 px", 24, 128, 4096, 512, 57),
                                                       ("FLUX.1-schnell 1024 px", 24, 128, 4096, 256, 57),
                                                       ("SD3.5-large 1024 px", 38, 64, 4096, 333, 38),
                                                       ("SD3.5-medium 1024 px", 24, 64, 4096, 333, 24)):
        n = image + text
        p_layer = batch * heads * n * n * bytes_per_value
        fused_layer = batch * heads * n * (head_dim * bytes_per_value + 4)
        rows.append({"model": name, "heads": heads, "head_dim": head_dim, "joint_tokens": n, "layers": layers,
                     "P_per_layer_gib": p_layer / 2**30, "P_all_layers_gib": layers * p_layer / 2**30,
                     "fused_per_layer_gib": fused_layer / 2**30, "fused_all_layers_gib": layers * fused_layer / 2**30})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=512, help="T5 tokens (FLUX.1-dev 512, schnell 256)")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--quick", action="store_true", help="the memory call, then 1 timed call per variant")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds instead of a minute on the CPU
        model = flux_dev_blocks(args.double, args.single)
    model = model.to(dtype).train()
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".attn.add_k_proj." in name or ".attn.add_v_proj." in name:
            p.requires_grad_(True)
    inputs = make_inputs(args.resolution, args.text_len, device, dtype)
    weights = torch.zeros(1, args.text_len, dtype=torch.bool, device=device)
    weights[0, CONCEPT_COLUMNS] = True
    image_tokens = inputs["hidden_states"].shape[1]
    joint = image_tokens + args.text_len
    layers = args.double + args.single
    print(f"FLUX.1-dev blocks {args.double} + {args.single}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"parameters, {device} {args.dtype}, {args.resolution} px: {image_tokens} image + {args.text_len} text = "
          f"{joint} joint tokens; P per layer {HEADS * joint * joint * 4 / 2**20:.0f} MiB in fp32")

    def make_call(step):
        def call():
            model.zero_grad(set_to_none=True)
            return step(model, inputs, weights)
        return call
    calls = {variant: make_call(step) for variant, step in VARIANTS.items()}
    tag = device_tag(device)
    out = args.out or RESULTS / f"mmdit_{tag}.json"
    payload = {
        "benchmark": "FLUX.1-dev blocks, one forward+backward with the Forget-Me-Not attention loss",
        "machine": machine_info(), "device": tag, "dtype": args.dtype,
        "fused_backend": "auto (" + ("triton" if device.type == "cuda" else "reference: materialises on a CPU") + ")",
        "blocks": {"double": args.double, "single": args.single}, "heads": HEADS, "head_dim": HEAD_DIM,
        "resolution": args.resolution, "image_tokens": image_tokens, "text_tokens": args.text_len,
        "joint_tokens": joint, "trainable": "text-side add_k_proj/add_v_proj of the double-stream blocks",
        "concept_columns": CONCEPT_COLUMNS, "repeats": repeats, "memory_method": memory_method(device),
        "sdpa_enabled": sdpa_settings(), "sdpa_backends": {"sdpa": "flash / efficient / math only (no cuDNN)",
                                                           "sdpa-default": "torch's choice"},
        "load_average_1_5_15min": {"start": os.getloadavg()}, "layers_measured": layers,
    }

    def save(rows):
        payload["results"] = rows
        write_json_atomic(out, payload)
    # Which SDPA kernels the stock variants run (torch profiler, one call each): the safe one now,
    # the default choice only after its measured run went through (it may poison the context).
    payload["sdpa_backends"]["sdpa"] = profiled_backends(calls["sdpa"])
    rows = run_variants(calls, device, repeats, save)
    payload["load_average_1_5_15min"]["end"] = os.getloadavg()
    if any(r["variant"] == "sdpa-default" and r["status"] == "ok" for r in rows):
        payload["sdpa_backends"]["sdpa-default"] = profiled_backends(calls["sdpa-default"])
    print_table(rows, ["variant", "status", "ms_median", "peak_extra_mib", "peak_total_mib", "result", "error"])
    losses = {r["variant"]: r.get("result") for r in rows}
    rel = None
    if losses.get("fused") is not None and losses.get("materialising"):
        rel = abs(losses["fused"] - losses["materialising"]) / abs(losses["materialising"])
        print(f"attention loss relative difference fused vs materialising: {rel:.2e}")
    print(f"SDPA backends: {payload['sdpa_backends']}")
    full = memory_model()
    print_table(full, ["model", "joint_tokens", "layers", "P_per_layer_gib", "P_all_layers_gib",
                       "fused_all_layers_gib"])

    payload.update(results=rows, loss_relative_difference=rel, full_size_memory_model_bf16_batch1=full)
    if device.type == "cpu":
        payload["note"] = ("On a CPU the fused variant runs fmn_kernels' PyTorch reference (fp32 maps), so its memory "
                           "is close to the materialising variant by construction; the O(N*D) kernel needs a GPU "
                           "(see the memory model). CPU times vary with the machine's load (see load_average).")
    write_json_atomic(out, payload)
    title = f"FLUX.1-dev blocks {args.double}+{args.single}, {args.resolution} px, {joint} joint tokens, {args.dtype}"
    plot([r for r in rows if r.get("ms_median")], out.with_suffix(".png"), f"{title}, {tag}", width=9)
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
