"""Which trainable set for MM-DiT forgetting: a short measurement on the tiny SD3 and FLUX pipelines.

For each train set (attn2, attn2-kv, unet, lora) and family: fmn.forget with the attention loss on
random reference latents (no image generation), the same lr and steps for every set; then
- held-out score ratio: the concept's attention loss on prompts not trained on, after / before
  (fixed latents, noise and timesteps; lower = more forgotten);
- retain drift: the relative change of the transformer's output on prompts without the concept
  (lower = less collateral change);
- trained parameters and patch size.
Tiny random models say how the sets behave mechanically (reach, collateral change), not what
a real model's images look like. Writes bench/results/mmdit_trainable_cpu.json.

    python bench/measure_mmdit_trainable.py [--steps 20] [--lr 1e-3]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, print_table, write_json_atomic  # noqa: E402

import fmn  # noqa: E402
from fmn.families.base import Prompts  # noqa: E402
from fmn.families.mmdit import MMDiTFamily  # noqa: E402
from fmn.testing import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

CONCEPT = "Van Gogh"
TRAIN_TEMPLATES = ["a painting by {}", "{} artwork"]
HELD_OUT = ["the starry night, Van Gogh style", "a portrait of a farmer by Van Gogh",
            "sunflowers in a vase, painted by van gogh"]
UNRELATED = ["a photo of a cat", "a red car on a street", "a bowl of fruit"]
T5_LEN = 32


def evaluation(pipe, family, prompts, concept=None, seed=0):
    """(mean attention loss over the prompts or None, transformer outputs) on fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(prompts), 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(200, 800, len(prompts)).long()
    with torch.no_grad():
        embeds, pooled = family.encode_prompts(prompts)
        text = Prompts(embeds.float(), pooled.float(), list(range(len(prompts))))
        x_t = family.add_noise(x0, noise, t)
        rows = torch.arange(len(prompts))
        if concept is None:
            return None, family.predict(pipe.transformer, x_t, t, text, rows)
        columns = family.concept_columns(prompts, [concept] * len(prompts))
        with fmn.concept_scores(pipe.transformer, columns, backend="reference") as recorder:
            out = family.predict(pipe.transformer, x_t, t, text, rows)
        return recorder.loss().item(), out


def measure(kind, train, steps, lr):
    pipe = tiny_sd3_pipeline() if kind == "sd3" else tiny_flux_pipeline()
    family = MMDiTFamily(pipe, max_sequence_length=T5_LEN)
    score_before, _ = evaluation(pipe, family, HELD_OUT, CONCEPT)
    _, unrelated_before = evaluation(pipe, family, UNRELATED)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    patch = fmn.forget(pipe, CONCEPT, latents, steps=steps, lr=lr, train=train, loss="attention",
                       template=TRAIN_TEMPLATES, resolution=64, progress=False, backend="reference",
                       inplace=True, patch_dtype="fp32")
    score_after, _ = evaluation(pipe, family, HELD_OUT, CONCEPT)
    _, unrelated_after = evaluation(pipe, family, UNRELATED)
    drift = ((unrelated_after - unrelated_before).norm() / unrelated_before.norm()).item()
    return {"family": kind, "train": train, "held_out_score_ratio": score_after / score_before,
            "retain_drift": drift, "trained_params": patch.summary["n_trainable"],
            "patch_kib": patch.nbytes / 1024, "train_loss_before": patch.summary["loss_before"],
            "train_loss_after": patch.summary["loss_after"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=RESULTS / "mmdit_trainable_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(kind, train, args.steps, args.lr) for kind in ("sd3", "flux")
            for train in ("attn2", "attn2-kv", "unet", "lora")]
    print_table(rows, ["family", "train", "held_out_score_ratio", "retain_drift", "trained_params", "patch_kib"])
    write_json_atomic(args.out, {"benchmark": "MM-DiT trainable sets on tiny random SD3/FLUX pipelines",
                                 "machine": machine_info(), "concept": CONCEPT, "train_templates": TRAIN_TEMPLATES,
                                 "held_out_prompts": HELD_OUT, "unrelated_prompts": UNRELATED,
                                 "steps": args.steps, "lr": args.lr, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
