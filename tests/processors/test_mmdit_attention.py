"""Fused MM-DiT processors (SD3 joint, FLUX double/single stream) on tiny random pipelines.

The oracle is diffusers' own processors with torch's SDPA replaced by an explicit fp32 softmax
that keeps every probability map (fmn.testing.MaterializedSDPA): scores, the FMN loss and its
gradients are read from those maps at the image rows and the concept's text columns, in each
family's joint layout (SD3 [image; text], FLUX [text; image]).
"""
import pytest
import torch

import fmn
from fmn.processors.attention import forgetting_loss
from fmn.processors.mmdit_attention import (FusedFluxAttnProcessor, FusedJointAttnProcessor, joint_attention_layers,
                                 zero_columns)
from fmn.processors.spans import mmdit_text_mask
from fmn.testing import MMDIT_T5_LENGTH, MaterializedSDPA, tiny_flux_pipeline, tiny_sd3_pipeline

KINDS = ("sd3", "flux")
BATCH = 2
IMAGE_TOKENS = 16  # 64 px: 8x8 latents, SD3 patches 2x2, FLUX packs 2x2
T5_LEN = 12


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_sd3_pipeline(), "flux": tiny_flux_pipeline()}


def text_len(kind):
    return 77 + T5_LEN if kind == "sd3" else T5_LEN


def transformer_inputs(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "sd3":
        return dict(hidden_states=torch.randn(BATCH, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(BATCH, text_len(kind), 64, generator=g),
                    pooled_projections=torch.randn(BATCH, 64, generator=g),
                    timestep=torch.tensor([500.0, 300.0]), return_dict=False)
    img_ids = torch.zeros(IMAGE_TOKENS, 3)
    img_ids[:, 1] = torch.arange(4).repeat_interleave(4)
    img_ids[:, 2] = torch.arange(4).repeat(4)
    return dict(hidden_states=torch.randn(BATCH, IMAGE_TOKENS, 16, generator=g),
                encoder_hidden_states=torch.randn(BATCH, T5_LEN, 64, generator=g),
                pooled_projections=torch.randn(BATCH, 32, generator=g), timestep=torch.tensor([0.5, 0.3]),
                img_ids=img_ids, txt_ids=torch.zeros(T5_LEN, 3), guidance=torch.tensor([3.5, 3.5]),
                return_dict=False)


def concept_columns(kind):
    """[B, text_len] concept weights: a few CLIP and T5 columns (SD3), T5 columns (FLUX); row 1 differs."""
    w = torch.zeros(BATCH, text_len(kind), dtype=torch.bool)
    start = 77 if kind == "sd3" else 0
    w[0, start + 2:start + 4] = True
    w[1, start + 5] = True
    if kind == "sd3":
        w[0, 3:5] = True
    return w


def joint_mask(kind, text_mask):
    """[B, S] joint columns in the family's layout."""
    image = torch.zeros(BATCH, IMAGE_TOKENS, dtype=torch.bool)
    return torch.cat([image, text_mask] if kind == "sd3" else [text_mask, image], dim=1)


def image_rows(kind):
    return slice(0, IMAGE_TOKENS) if kind == "sd3" else slice(T5_LEN, None)


def oracle_scores(kind, probs_list, weights):
    """Per joint layer: [B, H, N_image] = sum_j w_j p_ij^2 over the image rows."""
    joint = joint_mask(kind, weights).float()
    layers = [p for p in probs_list if p.shape[-1] == IMAGE_TOKENS + text_len(kind)]
    return [(p[:, :, image_rows(kind)].square() * joint[:, None, None, :]).sum(-1) for p in layers]


@pytest.mark.parametrize("kind", KINDS)
def test_layers_and_processor_types(pipes, kind):
    pipe = pipes[kind]
    names = [name for name, _ in joint_attention_layers(pipe)]
    expected = (["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
                if kind == "sd3" else ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                       "single_transformer_blocks.1.attn"])
    assert names == expected
    originals = [type(m.processor) for _, m in joint_attention_layers(pipe)]
    with fmn.use_fused_attention(pipe) as handle:
        cls = FusedJointAttnProcessor if kind == "sd3" else FusedFluxAttnProcessor
        assert all(type(p) is cls for p in handle.processors)
    assert [type(m.processor) for _, m in joint_attention_layers(pipe)] == originals


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_plain_mode_matches_stock_processors(pipes, kind, backend):
    transformer = pipes[kind].transformer
    x = transformer_inputs(kind)
    with torch.no_grad():
        stock = transformer(**x)[0]
        with fmn.use_fused_attention(transformer, backend=backend):
            fused = transformer(**x)[0]
    assert (fused - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_scores_loss_and_gradients_match_materialising_oracle(pipes, kind):
    transformer = pipes[kind].transformer
    x = transformer_inputs(kind, seed=1)
    weights = concept_columns(kind)
    names, params = zip(*[(n, p) for n, p in transformer.named_parameters() if ".attn" in n])

    with MaterializedSDPA() as sdpa:
        transformer(**x)
    expected = oracle_scores(kind, sdpa.probs, weights)
    oracle_loss = torch.stack([s.sum() for s in expected]).sum().sqrt()
    expected_grads = torch.autograd.grad(oracle_loss, params, allow_unused=True)

    with fmn.concept_scores(transformer, weights, backend="reference") as recorder:
        transformer(**x)
    assert len(recorder.scores) == (2 if kind == "sd3" else 3)  # SD3.5's image-only attn2 has no text
    for got, want in zip(recorder.scores, expected):
        assert got.shape == (BATCH, 2, IMAGE_TOKENS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    loss = recorder.loss()
    torch.testing.assert_close(loss, oracle_loss, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    compared = 0
    for name, got, want in zip(names, grads, expected_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
            compared += bool(want.abs().max() > 0)
    assert compared >= 10


@pytest.mark.parametrize("kind", KINDS)
def test_scores_on_the_triton_backend_match_reference(pipes, kind):
    transformer = pipes[kind].transformer
    x = transformer_inputs(kind, seed=2)
    weights = concept_columns(kind).float() * 0.5
    losses = {}
    for backend in ("reference", "triton"):
        with torch.no_grad(), fmn.concept_scores(transformer, weights, backend=backend) as recorder:
            transformer(**x)
        losses[backend] = forgetting_loss(recorder.scores)
    torch.testing.assert_close(losses["triton"], losses["reference"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_columns_matches_oracle_and_changes_output(pipes, kind):
    transformer = pipes[kind].transformer
    x = transformer_inputs(kind, seed=3)
    zero = concept_columns(kind)
    with torch.no_grad():
        plain = transformer(**x)[0]
        with MaterializedSDPA(zero_mask=joint_mask(kind, zero)):
            expected = transformer(**x)[0]
        with zero_columns(transformer, zero, backend="reference"):
            got = transformer(**x)[0]
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3


def generate(pipe, kind, prompt, **kwargs):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="pt",
                max_sequence_length=MMDIT_T5_LENGTH[kind], generator=torch.Generator().manual_seed(0),
                **kwargs).images


def spy_masks(transformer):
    """Records the shared context's zero_mask at every transformer call (hooks run after fmn's)."""
    seen = []

    def hook(module, args, kwargs):
        processor = next(m for _, m in joint_attention_layers(module)).processor
        mask = getattr(getattr(processor, "context", None), "zero_mask", None)
        seen.append(None if mask is None else mask.clone())
    return seen, hook


@pytest.mark.parametrize("kind", KINDS)
def test_suppress_zeroes_prompt_columns_and_leaves_negative_and_other_prompts(pipes, kind):
    pipe = pipes[kind]
    prompts = ["a painting by Van Gogh", "a photo of a cat"]
    guidance = dict(guidance_scale=2.0) if kind == "sd3" else dict(true_cfg_scale=2.0, negative_prompt=["Van Gogh"] * 2)
    with torch.no_grad():
        before = generate(pipe, kind, prompts, **guidance)
        seen, hook = spy_masks(pipe.transformer)
        with fmn.suppress(pipe, "van gogh", backend="reference"):
            handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                after = generate(pipe, kind, prompts, **guidance)
            finally:
                handle.remove()
    expected = mmdit_text_mask(pipe, prompts, "Van Gogh", max_sequence_length=MMDIT_T5_LENGTH[kind],
                               missing="ignore")
    assert expected[0].any() and not expected[1].any()
    if kind == "sd3":  # batched guidance [negative, positive]: the negative half has no columns
        assert len(seen) == 2 and all(torch.equal(m, torch.cat([torch.zeros_like(expected), expected])) for m in seen)
    else:  # true CFG: one call on the prompt (masked), one on the negative prompt (unmasked), per step
        assert len(seen) == 4 and all(torch.equal(m, expected) for m in seen[0::2])
        assert all(m is None for m in seen[1::2])
    assert (after[0] - before[0]).abs().max() > 1e-4
    assert torch.allclose(after[1], before[1], atol=1e-5)


def test_suppress_warns_when_no_prompt_holds_the_concept(pipes):
    with pytest.warns(UserWarning, match="occurred in none"), torch.no_grad():
        with fmn.suppress(pipes["flux"], "Van Gogh", backend="reference"):
            generate(pipes["flux"], "flux", "a photo of a cat")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs(pipes, kind):
    transformer = pipes[kind].transformer
    x = transformer_inputs(kind)
    wrong = torch.zeros(BATCH, text_len(kind) + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"concept_weights has shape \[2, %d\].*expected \[2, %d\]"
                       % (text_len(kind) + 1, text_len(kind))):
        with torch.no_grad(), fmn.concept_scores(transformer, wrong, backend="reference"):
            transformer(**x)
    with pytest.raises(TypeError, match="zero_mask must be bool"):
        with zero_columns(transformer, torch.zeros(BATCH, text_len(kind))):
            pass
    with pytest.raises(ValueError, match="concept_weights must be 2-D"):
        with fmn.concept_scores(transformer, torch.zeros(text_len(kind))):
            pass
    with pytest.raises(ValueError, match="backend must be 'auto'"):
        fmn.use_fused_attention(transformer, backend="cuda")
    with pytest.raises(ValueError, match="include_eos is not supported"):
        with fmn.suppress(pipes[kind], "cat", include_eos=True):
            pass
    # processors left in place after the failures
    assert not any(isinstance(m.processor, (FusedJointAttnProcessor, FusedFluxAttnProcessor))
                   for _, m in joint_attention_layers(transformer))


def test_foreign_processor_is_refused(pipes):
    transformer = pipes["sd3"].transformer
    layer = transformer.transformer_blocks[0].attn
    original = layer.processor

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            raise AssertionError("not called")

    layer.set_processor(Custom())
    try:
        with pytest.raises(ValueError, match="transformer_blocks.0.attn' uses Custom"):
            fmn.use_fused_attention(transformer)
    finally:
        layer.set_processor(original)


def test_flux_fused_qkv_projections_are_followed():
    transformer = tiny_flux_pipeline().transformer
    x = transformer_inputs("flux")
    with torch.no_grad():
        stock = transformer(**x)[0]
        transformer.fuse_qkv_projections()
        assert transformer.transformer_blocks[0].attn.fused_projections
        with fmn.use_fused_attention(transformer, backend="reference"):
            fused = transformer(**x)[0]
    assert (fused - stock).abs().max().item() <= 1e-5
