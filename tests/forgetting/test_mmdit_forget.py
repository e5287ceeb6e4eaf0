"""Forgetting on tiny SD3 and FLUX pipelines: a short run lowers the concept's attention loss on
prompts it was not trained on, patches round-trip and refuse the wrong model, and the CLI's
forget / apply / generate --compare work on saved pipeline folders loaded back offline."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline

import fmn
from fmn.cli.commands import main as cli
from fmn.families.mmdit import MMDiTFamily
from fmn.cli.grid import cell, layout
from fmn.patches.patch import PatchMismatchError, get_tensor
from fmn.testing import tiny_flux_pipeline, tiny_sd3_pipeline

KINDS = ("sd3", "flux")
BUILD = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
CONCEPT = "Van Gogh"
HELD_OUT = ["sunflowers, Van Gogh style", "a farmer painted by van gogh"]
FAST = dict(steps=8, lr=3e-3, resolution=64, template=["a painting by {}"], backend="reference",
            progress=False)


def held_out_loss(pipe, prompts, concept):
    """The concept's attention loss on fixed latents, noise and timesteps for each prompt."""
    family = MMDiTFamily(pipe, max_sequence_length=24)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(prompts), 4, 8, 8, generator=g)
    t = torch.linspace(300, 700, len(prompts)).long()
    with torch.no_grad():
        embeds, pooled = family.encode_prompts(prompts)
        x_t = family.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        columns = family.concept_columns(prompts, [concept] * len(prompts))
        with fmn.concept_scores(pipe.transformer, columns, backend="reference") as recorder:
            family.predict(pipe.transformer, x_t, t, SimpleNamespace(embeds=embeds, pooled=pooled),
                           torch.arange(len(prompts)))
        return recorder.loss().item()


@pytest.mark.parametrize("kind", KINDS)
def test_forgetting_lowers_held_out_score_and_patch_round_trips(kind, tmp_path):
    pipe = BUILD[kind]()
    before = held_out_loss(pipe, HELD_OUT, CONCEPT)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    patch = fmn.forget(pipe, CONCEPT, latents, **FAST)
    assert held_out_loss(pipe, HELD_OUT, CONCEPT) == before  # inplace=False: the pipeline is back
    assert all(k.startswith("transformer.") and ".attn." in k for k in patch.tensors)
    assert patch.summary["loss_after"] < patch.summary["loss_before"]

    path = patch.save(tmp_path / "p.safetensors")
    fresh = BUILD[kind]()
    fmn.apply(fresh, path)
    after = held_out_loss(fresh, HELD_OUT, CONCEPT)
    assert after < 0.9 * before, (before, after)
    name = next(iter(patch.tensors))
    base = get_tensor(BUILD[kind](), name)
    torch.testing.assert_close(get_tensor(fresh, name) - base, patch.tensors[name].float(), rtol=0, atol=1e-3)
    with pytest.raises(PatchMismatchError):
        fmn.apply(fresh, path)  # the fp32 base has moved: applying twice is refused
    with pytest.raises(PatchMismatchError):
        fmn.apply(BUILD["flux" if kind == "sd3" else "sd3"](), path)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_run_gives_a_loadable_patch(kind):
    pipe = BUILD[kind]()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    patch = fmn.forget(pipe, CONCEPT, latents, train="lora", **{**FAST, "steps": 3})
    assert patch.kind == "lora" and any(".add_k_proj.lora_A." in k for k in patch.tensors)
    fmn.apply(pipe, patch)
    assert not getattr(pipe.transformer, "peft_config", None)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_forget_apply_generate_on_a_pipeline_folder(kind, tmp_path):
    model = tmp_path / "model"
    BUILD[kind]().save_pretrained(str(model))
    patch, baked, grid = tmp_path / "p.safetensors", tmp_path / "baked", tmp_path / "grid.png"
    common = ["--quiet", "--device", "cpu"]
    assert cli(["forget", "--model", str(model), "--concept", CONCEPT, "--out", str(patch), "--steps", "2",
                "--lr", "1e-3", "--resolution", "64", "--n-images", "1", "--gen-steps", "1",
                "--template", "a painting by {}", "--backend", "reference", *common]) == 0
    assert cli(["apply", "--model", str(model), "--patch", str(patch), "--out", str(baked), *common]) == 0
    assert cli(["generate", "--model", str(model), "--patch", str(patch), "--prompt", "a painting by Van Gogh",
                "--compare", "--n", "1", "--steps", "1", "--resolution", "64", "--out", str(grid), *common]) == 0
    loaded = DiffusionPipeline.from_pretrained(str(baked))
    name = next(iter(fmn.load_patch(patch).tensors))
    original = DiffusionPipeline.from_pretrained(str(model))
    assert not torch.equal(get_tensor(loaded, name), get_tensor(original, name))
    from PIL import Image
    # one prompt x (base, patched), 64 px images, labelled (fmn.cli.grid)
    lay = layout((64, 64), ["a painting by Van Gogh"], ["base s0", "patched s0"])
    assert Image.open(grid).size == cell(lay, 0, 1)[2:]


def test_visual_loss_run_on_generated_pairs():
    pipe = BUILD["flux"]()
    patch = fmn.forget(pipe, CONCEPT, loss="both", n_images=1, gen_steps=1, **{**FAST, "steps": 2})
    assert patch.summary["n_reference"] == 1 and patch.tensors


def test_bad_inputs_name_the_option():
    pipe = BUILD["sd3"]()
    with pytest.raises(ValueError, match="train must be one of"):
        fmn.forget(pipe, CONCEPT, torch.zeros(1, 4, 8, 8), train="attn", **FAST)
    with pytest.raises(ValueError, match="include_eos"):
        fmn.forget(pipe, CONCEPT, torch.zeros(1, 4, 8, 8), include_eos=True, **FAST)


def test_flux_generated_and_encoded_references_share_one_latent_form(tmp_path):
    """Image files (VAE-encoded, unpacked) and drawn images (FluxPipeline's packed latents) mix."""
    from PIL import Image
    pipe = BUILD["flux"]()
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(folder / "a.png")
    patch = fmn.forget(pipe, CONCEPT, str(folder), loss="both", n_images=1, gen_steps=1, retain=["a cat"],
                       retain_images=1, anchor="a dog", **{**FAST, "steps": 2})
    assert patch.summary["n_reference"] == 2 and patch.summary["retain_losses"] and patch.summary["anchor_losses"]
