"""A full forgetting run (fmn.forget) on the SD 2.1-base architecture with random weights.

What is timed: `fmn.forget(pipe, "cat", images=latents, steps=35, batch_size=B, ...)` on a
StableDiffusionPipeline whose UNet has SD 2.1-base's architecture (config inline below, random
weights, 512 px = 64x64 latents), with 10 random reference latents (the authors' 10 images,
encoded once: the VAE is not part of the run) and a tiny 1-layer text encoder of width 1024 (the
text is encoded once, so its size does not matter for the loop). Trainable set attn2 (the
default) and a LoRA (rank 4); the patch is saved and its file size reported.

Attention: "fused" = fmn's processor on the Triton kernels (GPU only; on a CPU the Triton
interpreter would measure Python), "materialising" = the same processor on its PyTorch reference
backend, which keeps every layer's N x 77 softmax map in fp32. On a GPU each runs with CUDA graphs
(the default: the steps' UNet calls captured once, then replayed; the capture is inside the timed
steps) and without (cuda_graphs=False); the summary's word on the graphs is stored per run.

Numbers per run: seconds for the training steps (`seconds_train`, the 35-step loop), for the whole
call (`seconds_total`: text encoding, loss before/after, fingerprint and patch included), peak
memory (CUDA: max_memory_allocated over the call, weights included; CPU: the resident set's
high-water mark over the call, VmHWM after a reset through /proc/self/clear_refs), patch bytes.
Goals on one H100 / H200: the 35 steps at batch 1 in <= 2.5 s, the fused run <= 0.8x
the materialising run; peak memory under 8 GB, patch under 50 MB. On a CPU one step at batch 1
(and 4 without --quick) is timed. A configuration that raises is reported (status, error) and the
others go on; the JSON is rewritten after each one (a run left "running" is where the process died).

    python bench/bench_forget.py --quick    # H200: batch 1, bf16, fused/materialising x graphs on/off, ~60 s
    python bench/bench_forget.py [--device cuda] [--out PATH.json]
Writes bench/results/forget_<device>.json and .png (or PATH.json / PATH.png).
"""
import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, SD21_BASE_UNET, cuda_context_lost, device_tag, machine_info, print_table,  # noqa: E402
                    proc_status_kib, reset_peak_rss, sdpa_backends, sdpa_settings, short_error, write_json_atomic)

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

import fmn  # noqa: E402
from fmn.processors.tokenizer import clip_tokenizer  # noqa: E402
from fmn.forgetting.options import PRECISIONS  # noqa: E402
from fmn.patches.patch import SCALE_SUFFIX, quantize_delta  # noqa: E402

N_REFERENCE = 10
RESOLUTION = 512


def build_pipeline(device):
    """SD 2.1-base UNet (random), tiny text encoder of width 1024, tiny VAE (unused: latents given)."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=16,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0, hidden_act="gelu"))
        vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=32)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(pad_token="!"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def run_once(pipe, device, *, backend, precision, batch, steps, train, warmup, graphs=True, resolution=RESOLUTION):
    side = resolution // 8
    lat = torch.randn(N_REFERENCE, 4, side, side, generator=torch.Generator().manual_seed(0))
    kw = dict(images=lat, steps=steps, batch_size=batch, train=train, precision=precision, resolution=resolution,
              backend=backend, progress=False, device=str(device), base_model="sd21-base-architecture-random",
              cuda_graphs=graphs)
    if warmup:  # compile / autotune the kernels for these shapes; first-touch allocations
        fmn.forget(pipe, "cat", **{**kw, "steps": min(2, steps)})
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
    hwm_ok = device.type == "cpu" and reset_peak_rss()
    start = time.perf_counter()
    patch = fmn.forget(pipe, "cat", **kw)
    wall = time.perf_counter() - start
    s = patch.summary
    with tempfile.TemporaryDirectory() as d:
        size = os.path.getsize(patch.save(Path(d) / "p.safetensors"))
        size_int8 = None
        if patch.kind == "delta":  # the same run's patch with --patch-dtype int8
            int8 = {}
            for name, delta in patch.tensors.items():
                int8[name], int8[name + SCALE_SUFFIX] = quantize_delta(delta)
            size_int8 = os.path.getsize(dataclasses.replace(patch, tensors=int8).save(Path(d) / "p8.safetensors"))
    if device.type == "cuda":
        peak = s["peak_memory_bytes"]
    else:
        peak = proc_status_kib("VmHWM") * 1024 if hwm_ok else s["peak_rss_bytes"]
    return {
        "attention": "fused" if backend == "triton" else "materialising", "backend": backend,
        "precision": precision, "batch": batch, "train": train, "steps": steps, "status": "ok",
        "cuda_graphs_status": s.get("cuda_graphs"), "seconds_train": s["seconds_train"],
        "seconds_per_step": s["seconds_train"] / steps,
        "seconds_total": wall, "peak_memory_bytes": peak, "peak_memory_gib": peak / 2**30 if peak else None,
        "patch_bytes": size, "patch_mib": size / 2**20, "patch_int8_bytes": size_int8,
        "n_trainable": s["n_trainable"],
        "loss_before": s["loss_before"], "loss_after": s["loss_after"],
    }


def unet_sdpa_backends(unet, device, side=64):
    """The SDPA backends the UNet's self-attention runs in a training step (one profiled call)."""
    try:
        x = torch.randn(1, 4, side, side, device=device, dtype=unet.dtype)
        text = torch.randn(1, 77, 1024, device=device, dtype=unet.dtype)
        t = torch.tensor([500], device=device)
        backends = sdpa_backends(lambda: unet(x, t, text).sample.float().mean().backward())
        unet.zero_grad(set_to_none=True)
        return backends
    except Exception as e:  # a profile that fails changes no figure
        return f"not profiled: {short_error(e)}"


def ratios(rows):
    """seconds_train ratios of the batch-1 bf16 attn2 runs: fused / materialising (graphs on and off), and
    graphs on / off (fused, materialising)."""
    t = {(r["attention"], r["cuda_graphs"]): r["seconds_train"] for r in rows
         if r["status"] == "ok" and r["batch"] == 1 and r["train"] == "attn2" and r["precision"] == "bf16"}
    out = {}
    for g in ("on", "off"):
        if ("fused", g) in t and ("materialising", g) in t:
            out[f"fused_over_materialising_graphs_{g}"] = t[("fused", g)] / t[("materialising", g)]
    for attention in ("fused", "materialising"):
        if (attention, "on") in t and (attention, "off") in t:
            out[f"{attention}_graphs_on_over_off"] = t[(attention, "on")] / t[(attention, "off")]
    return out


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['attention']}\n{r['precision']} b{r['batch']}\n{r['train']}"
              + ("\ngraphs" if str(r.get("cuda_graphs", "")).startswith("on") else "") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.6 * len(rows) * 1.5), 4.2))
    goal_s = 2.5 if rows[0]["steps"] == 35 else None
    for ax, key, unit, goal in ((axes[0], "seconds_train", "s (training steps)", goal_s),
                                (axes[1], "peak_memory_gib", "GiB peak", 8e9 / 2**30),
                                (axes[2], "patch_mib", "MiB patch", 50e6 / 2**20)):
        vals = [r[key] or 0 for r in rows]
        colors = ["tab:blue" if r["attention"] == "fused" else "tab:orange" for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel(unit)
        if goal and rows[0].get("device_type") == "cuda":
            ax.axhline(goal, color="red", ls="--", lw=1, label="goal")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations (GPU: bf16 only; CPU: batch 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="default 35 on a GPU, 1 on a CPU")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes next to it)")
    ap.add_argument("--resolution", type=int, default=RESOLUTION, help="pixels (a small one for a CPU smoke run)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4 on a GPU, 1 on a CPU, "
                    "where batch 4 at 512 px needs ~12 GB of RAM and minutes per step)")
    a = ap.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    steps = a.steps or (35 if gpu else 1)
    batches = [int(b) for b in a.batches.split(",")] if a.batches else ([1, 4] if gpu else [1])
    if gpu:  # (backend, precision, batch, train, CUDA graphs); fused first
        configs = [(b, "bf16", batches[0], "attn2", g) for b in ("triton", "reference") for g in (True, False)]
        if not a.quick:
            configs += [(b, p, n, "attn2", True) for p in ("bf16", "fp32") for b in ("triton", "reference")
                        for n in batches if (p, n) != ("bf16", batches[0])]
            configs += [("triton", "bf16", n, "lora", True) for n in batches]
    else:
        configs = [("reference", "fp32", n, "attn2", False) for n in batches]
        if not a.quick:
            configs.append(("reference", "fp32", batches[0], "lora", False))

    t0 = time.perf_counter()
    pipe = build_pipeline(device)
    build_s = time.perf_counter() - t0
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    print(f"SD 2.1-base UNet, {n_unet / 1e6:.0f} M parameters, built on {device} in {build_s:.1f} s; "
          f"{steps} step(s) per run", flush=True)
    tag = device_tag(device) + ("_quick" if a.quick else "")
    out = a.out or RESULTS / f"forget_{tag}.json"
    pipe.to(dtype=PRECISIONS[configs[0][1]])  # the SDPA backends profiled below: at the first run's dtype
    info = machine_info()
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    info["torch_threads"] = torch.get_num_threads()
    payload = {
        "benchmark": "fmn.forget full run, SD 2.1-base architecture, random weights",
        "machine": info,
        "shapes": {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in SD21_BASE_UNET.items()},
                   "unet_parameters": n_unet, "latents": [N_REFERENCE, 4, a.resolution // 8, a.resolution // 8],
                   "resolution": a.resolution,
                   "text": [77, 1024], "text_encoder": "1-layer CLIP, width 1024 (text encoded once)"},
        "dtype_note": "precision = autocast dtype; UNet weights cast to it, trained tensors kept in fp32",
        "goals_gpu": {"seconds_35_steps_batch_1": 2.5, "fused_over_materialising": 0.8,
                      "peak_memory_bytes": 8e9, "patch_bytes": 50e6},
        "sdpa_enabled": sdpa_settings(), "sdpa_backends_self_attention": unet_sdpa_backends(pipe.unet, device,
                                                                                               a.resolution // 8),
        "runs": [],
    }
    rows = payload["runs"]
    columns = ["attention", "precision", "batch", "train", "cuda_graphs", "status", "seconds_train",
               "seconds_per_step", "seconds_total", "peak_memory_gib", "patch_mib"]
    lost = None
    for backend, precision, batch, train, graphs in configs:
        row = {"attention": "fused" if backend == "triton" else "materialising", "backend": backend,
               "precision": precision, "batch": batch, "train": train, "steps": steps, "device_type": device.type,
               "cuda_graphs": "on" if graphs and gpu else "off", "status": "running"}
        rows.append(row)
        if lost:
            row.update(status="skipped", error=f"the CUDA context was lost in an earlier run ({lost})")
            continue
        write_json_atomic(Path(out), payload)
        dtype = PRECISIONS[precision]
        try:
            if pipe.unet.dtype != dtype:
                pipe.to(dtype=dtype)
            row.update(run_once(pipe, device, backend=backend, precision=precision, batch=batch, steps=steps,
                                train=train, warmup=gpu, graphs=graphs, resolution=a.resolution))
        except Exception as e:  # report, go on (out of memory, a kernel or capture that fails ...)
            row.update(status="error", error=short_error(e))
            if cuda_context_lost(device):
                lost = f"{row['attention']} {precision} b{batch} {train}"
        write_json_atomic(Path(out), payload)
        print_table([row], columns + (["error"] if "error" in row else []))
        sys.stdout.flush()
    payload["ratios"] = ratios(rows)

    print()
    print_table(rows, columns + ["loss_before", "loss_after"])
    print(f"ratios: {payload['ratios']}")
    write_json_atomic(Path(out), payload)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        plot(ok, Path(out).with_suffix(".png"),
             f"fmn.forget, SD 2.1-base arch., {steps} step(s), {info.get('gpu', info['processor'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
