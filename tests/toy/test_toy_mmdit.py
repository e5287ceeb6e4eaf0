"""The built-in MM-DiT toy model ("toy-mmdit"): its builders, its training script, the shipped files."""
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fmn.toy import mmdit_model as MM

ROOT = Path(__file__).resolve().parents[2]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_toy_mmdit", ROOT / "scripts" / "train_toy_mmdit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pad_collapsed_processor_equals_the_pipelines_zero_tokens():
    """One zero token with a log(n) bias == n zero tokens through diffusers' own JointAttnProcessor2_0."""
    torch.manual_seed(0)
    tok = MM.build_tokenizer()
    tes = [MM.build_text_encoder(tok), MM.build_text_encoder(tok)]
    tr = MM.build_transformer(dim=64, layers=2).eval()
    ids = tok(["a red circle", "a photo of a blue star"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        slots, pooled = MM.clip_slots(tes, ids)
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([250.0, 800.0])
        full = {n: tr(x, torch.cat([slots, slots.new_zeros(2, n, slots.shape[2])], 1), pooled, t).sample
                for n in (1, 256)}
        proc = MM.set_pad_collapsed(tr, 256)
        one = torch.cat([slots, slots.new_zeros(2, 1, slots.shape[2])], 1)
        collapsed = tr(x, one, pooled, t).sample
        proc.set_count(torch.tensor([1.0, 256.0]))  # per-sample counts, as training draws them
        mixed = tr(x, one, pooled, t).sample
    assert torch.allclose(collapsed, full[256], atol=1e-5)
    assert torch.allclose(mixed[0], full[1][0], atol=1e-5) and torch.allclose(mixed[1], full[256][1], atol=1e-5)
    assert not torch.allclose(full[1], full[256], atol=1e-3)  # the count matters, so the check is not vacuous
    with pytest.raises(ValueError, match="pad_count"):
        proc.set_count(0)


def test_transformer_ignores_the_pooled_text_vector():
    tr = MM.build_transformer(dim=64, layers=1).eval()
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 9, 2 * MM.TEXT_HIDDEN), torch.tensor([500.0])
    with torch.no_grad():
        a = tr(x, ctx, torch.randn(1, 2 * MM.TEXT_PROJECTION), t).sample
        b = tr(x, ctx, torch.randn(1, 2 * MM.TEXT_PROJECTION), t).sample
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in tr.time_text_embed.text_embedder.parameters())


def test_training_first_steps_are_reproducible():
    script = _train_script()
    small = ["--steps", "3", "--pool", "16", "--batch", "4", "--probe-every", "0", "--probe-size", "2",
             "--log-every", "100", "--warmup", "2"]  # the shipped model's sizes, little data
    _, first, _ = script.train(script.parse_args(small))
    _, second, _ = script.train(script.parse_args(small))
    assert first == second  # bit for bit
    assert len(first) == 3 and all(0.5 < v < 10 for v in first)
    _, other, _ = script.train(script.parse_args(small + ["--seed", "1"]))
    assert other != first
    with pytest.raises(SystemExit):
        script.parse_args(["--steps", "0"])


def test_a_further_stage_starts_from_the_saved_model():
    """--init-from: the saved transformer, text encoders and latent normalisation, not fresh ones."""
    from diffusers import SD3Transformer2DModel

    from fmn.toy import model_path
    script = _train_script()
    folder = model_path("toy-mmdit")
    args = script.parse_args(["--init-from", folder, "--pool", "16", "--probe-size", "2"])
    st = script.prepare(args, t0=0.0)
    saved = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
    for (name, a), b in zip(st["transformer"].state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name
    cfg = json.loads((Path(folder) / "vae" / "config.json").read_text())
    assert (st["shift"], st["scale"]) == (cfg["shift_factor"], cfg["scaling_factor"])
    assert not any(p.requires_grad for p in st["transformer"].time_text_embed.text_embedder.parameters())
    fresh = script.prepare(script.parse_args(["--pool", "16", "--probe-size", "2"]), t0=0.0)
    assert not torch.equal(fresh["text_encoders"][0].text_model.embeddings.token_embedding.weight,
                           st["text_encoders"][0].text_model.embeddings.token_embedding.weight)


# ---------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def pipe():
    from fmn.toy import load_pipeline
    return load_pipeline("toy-mmdit")


def test_load_pipeline_names_both_models(pipe):
    from diffusers import StableDiffusion3Pipeline

    from fmn.toy import load_pipeline, model_path
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert pipe.transformer.dtype == torch.float32
    assert Path(model_path("toy-mmdit")).name == "mmdit" and Path(model_path("toy")).name == "pipeline"
    with pytest.raises(ValueError, match="model must be one of"):
        load_pipeline("toy-dit")


def test_toy_mmdit_makes_32px_images_in_two_steps(pipe):
    gen = [torch.Generator().manual_seed(0)]
    img = pipe(prompt=["a red circle"], generator=gen, num_inference_steps=2, guidance_scale=5.0,
               output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.01


def test_shipped_files_match_their_recorded_sizes_and_hashes():
    from fmn.toy import model_path
    folder = Path(model_path("toy-mmdit"))
    info = json.loads((folder / "training_info.json").read_text())
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"training_info.json"}
    assert files == set(info["files"])
    for name, rec in info["files"].items():
        blob = (folder / name).read_bytes()
        assert len(blob) == rec["bytes"] and hashlib.sha256(blob).hexdigest() == rec["sha256"], name
    assert sum(rec["bytes"] for rec in info["files"].values()) <= 10_000_000
    assert info["args"]["seed"] == info["seed"] and info["threads"] == 2
