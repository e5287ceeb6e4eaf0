"""What one GPU holds when fmn trains on FLUX.1-dev: the activation memory of the fused attention-loss
step per transformer block, measured at 1024 px (bf16, batch 1) on 2 + 2 and 4 + 4 FLUX.1-dev blocks
(random weights; bench_mmdit.py's fused step, text-side key/value projections trainable), so that the
slope gives the per-block figure docs/multi-gpu.md scales to the 19 + 38 blocks. Each configuration
runs on its own; a failure (out of memory, a kernel error) is recorded and the next one still runs.

    python bench/measure_flux_memory.py          # CUDA only, ~1 min on an H200
Writes bench/results/flux_memory_<gpu>.json.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mmdit import CONCEPT_COLUMNS, flux_dev_blocks, fused_step, make_inputs  # noqa: E402
from bench_unet import measure_peak  # noqa: E402
from common import RESULTS, device_tag, machine_info, print_table, write_json_atomic  # noqa: E402

CONFIGS = ((2, 2), (4, 4))
RESOLUTION, TEXT_LEN = 1024, 512


def measure(double, single, device) -> dict:
    row = {"double": double, "single": single, "resolution": RESOLUTION, "text_tokens": TEXT_LEN}
    try:
        torch.manual_seed(0)
        model = flux_dev_blocks(double, single).to(device, torch.bfloat16).train()
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if ".attn.add_k_proj." in name or ".attn.add_v_proj." in name:
                p.requires_grad_(True)
        row["weights_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        inputs = make_inputs(RESOLUTION, TEXT_LEN, device, torch.bfloat16)
        weights = torch.zeros(1, TEXT_LEN, dtype=torch.bool, device=device)
        weights[0, CONCEPT_COLUMNS] = True
        fused_step(model, inputs, weights)  # first call: Triton compiles
        model.zero_grad(set_to_none=True)
        loss, extra, total = measure_peak(lambda: fused_step(model, inputs, weights), device)
        row.update(loss=loss, step_peak_extra_mib=extra, step_peak_total_mib=total)
    except Exception as e:  # recorded; the other configuration still runs
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    finally:
        torch.cuda.empty_cache()
    return row


def main():
    if not torch.cuda.is_available():
        sys.exit("measure_flux_memory.py needs a CUDA GPU")
    device = torch.device("cuda")
    rows = [measure(d, s, device) for d, s in CONFIGS]
    print_table(rows, ["double", "single", "weights_mib", "step_peak_extra_mib", "step_peak_total_mib", "error"])
    ok = [r for r in rows if "error" not in r]
    slope = None
    if len(ok) == 2:  # per block (double and single alike), activations above the weights and inputs
        slope = (ok[1]["step_peak_extra_mib"] - ok[0]["step_peak_extra_mib"]) / (
            ok[1]["double"] + ok[1]["single"] - ok[0]["double"] - ok[0]["single"])
        print(f"activation memory per block at {RESOLUTION} px: {slope:.0f} MiB")
    out = RESULTS / f"flux_memory_{device_tag(device)}.json"
    write_json_atomic(out, {"benchmark": "FLUX.1-dev blocks, fused attention-loss step, peak memory per block",
                            "machine": machine_info(), "dtype": "bfloat16", "batch": 1, "results": rows,
                            "activation_mib_per_block": slope,
                            "memory_method": "torch.cuda.max_memory_allocated above memory_allocated before the step"})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
