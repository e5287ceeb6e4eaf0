"""The MM-DiT family (fmn.families.mmdit) on tiny SD3 and FLUX pipelines: flow-matching noise and
targets against the scheduler's own schedule, FLUX packing against FluxPipeline's, the denoiser call
against the pipeline's, trainable sets and concept columns."""
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fmn.families.mmdit import MMDiTFamily, image_ids, pack_latents, unpack_latents
from fmn.testing import tiny_flux_pipeline, tiny_sd3_pipeline

KINDS = ("sd3", "flux")
T5_LEN = 16


@pytest.fixture(scope="module")
def families():
    return {"sd3": MMDiTFamily(tiny_sd3_pipeline(), max_sequence_length=T5_LEN),
            "flux": MMDiTFamily(tiny_flux_pipeline(), max_sequence_length=T5_LEN)}


def test_flux_packing_and_ids_match_the_pipeline():
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)
    assert torch.equal(image_ids(8, 6, "cpu"), FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_flow_matching_noise_target_and_x0(families, kind):
    family = families[kind]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    sigma = family.sigma(x0, t)
    assert sigma.flatten()[0] < 0.02 and sigma.flatten()[2] == 1.0 and (sigma.flatten().diff() > 0).all()
    x_t = family.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(family.x0_estimate(x_t, family.target(x0, noise, t), t), x0, rtol=0, atol=1e-5)


def test_flux_sigmas_follow_the_pipeline_shift_for_the_image_length(families):
    """FluxPipeline at 64 px (16 image tokens) shifts sigmas by mu(16); the training schedule too."""
    family = families["flux"]
    scheduler = family.pipe.scheduler
    c = scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sigmas = np.linspace(1.0, 1 / 1000, 1000)
    expected = np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1))  # the scheduler's exponential time shift
    got = family.sigma(torch.zeros(1, 4, 8, 8), torch.arange(1000).flip(0)).flatten()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # another resolution, another shift
    assert family.sigma(torch.zeros(1, 4, 32, 32), torch.tensor([500])) > family.sigma(torch.zeros(1, 4, 8, 8),
                                                                                        torch.tensor([500]))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_predict_match_the_pipeline(families, kind):
    family = families[kind]
    pipe = family.pipe
    prompts = ["a painting by Van Gogh", "a photo of a cat"]
    embeds, pooled = family.encode_prompts(prompts)
    assert embeds.shape[:2] == (2, 77 + T5_LEN if kind == "sd3" else T5_LEN)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    timestep = family.schedule(x_t)[1][t]
    text = type("Text", (), {"embeds": embeds, "pooled": pooled})()
    with torch.no_grad():
        got = family.predict(pipe.transformer, x_t, t, text, torch.arange(2))
        if kind == "sd3":
            want = pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]
        else:
            packed = FluxPipeline._pack_latents(x_t, 2, 4, 8, 8)
            out = pipe.transformer(hidden_states=packed, timestep=timestep / 1000, guidance=torch.tensor([3.5, 3.5]),
                                   pooled_projections=pooled, encoder_hidden_states=embeds,
                                   txt_ids=torch.zeros(T5_LEN, 3),
                                   img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                                   return_dict=False)[0]
            want = FluxPipeline._unpack_latents(out, 64, 64, 8)
            packed_out = family.predict(pipe.transformer, packed, t, text, torch.arange(2))
            torch.testing.assert_close(packed_out, out)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_sets_and_columns(families, kind):
    family = families[kind]
    kv = [n for n, _ in family.trainable("attn2-kv")]
    assert kv and all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in kv)
    attn = [n for n, _ in family.trainable("attn2")]
    assert set(kv) < set(attn) and all(".attn." in n for n in attn)
    assert not any("attn2" in n for n in attn)  # SD3.5's image-only attention reads no text
    assert len(family.trainable("unet")) == len(list(family.denoiser.parameters()))
    names = [n for n, _ in family.attention_layers()]
    assert names and not any(n.endswith("attn2") for n in names)
    columns = family.concept_columns(["a painting by Van Gogh", "Van Gogh sunflowers"], ["van gogh", "Van Gogh"])
    assert columns.shape == (2, 77 + T5_LEN if kind == "sd3" else T5_LEN) and columns.any(1).all()
    with pytest.raises(ValueError, match="include_eos is not supported"):
        family.concept_columns(["a cat"], ["cat"], include_eos=True)
    with pytest.raises(ValueError, match="found by none of the text encoders"):
        family.concept_columns(["a cat"], ["dog"])
