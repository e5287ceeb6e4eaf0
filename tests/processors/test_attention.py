"""fmn.attention on tiny SD-1.x-, SD-2.x- and SDXL-like UNets and pipelines (random weights, offline).

Oracles: diffusers' own AttnProcessor2_0 for outputs, and fmn.testing's
MaterializingCrossAttnProcessor (the authors' way: full [B*H, N, 77] softmax maps, concept columns
selected, L2 norm; zeroing done on V) for scores, losses, gradients and suppression.
Most tests use backend="reference"; test_auto_backend runs the same checks through "auto"
(the Triton kernels, under the interpreter on a CPU).
"""
import warnings

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import fmn
import fmn.processors.attention as fa
from fmn.processors.spans import concept_token_mask, with_guidance
from fmn.testing import (MaterializingCrossAttnProcessor, set_cross_attention_processor, tiny_sd_pipeline,
                         tiny_unet)

KINDS = ["sd1", "sd2", "sdxl"]
CONTEXT_DIM = {"sd1": 32, "sd2": 48, "sdxl": 64}
REF = "reference"


@pytest.fixture(scope="module")
def unets():
    return {kind: tiny_unet(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def pipes():
    pipes = {kind: tiny_sd_pipeline(kind) for kind in KINDS}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def unet_inputs(kind, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(sample=torch.randn(batch, 4, 8, 8, generator=g).to(dtype),
                  timestep=torch.tensor([10, 500, 900, 999][:batch]),
                  encoder_hidden_states=torch.randn(batch, 77, CONTEXT_DIM[kind], generator=g).to(dtype))
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g).to(dtype),
                                           time_ids=torch.tensor([[16., 16., 0., 0., 16., 16.]] * batch).to(dtype))
    return kwargs


def concept_mask(batch=2):
    """Different columns per sample, so a head-major/batch-major mix-up changes the result."""
    mask = torch.zeros(batch, 77, dtype=torch.bool)
    mask[0, 5] = True
    mask[1, [2, 3, 9]] = True
    return mask


def processors(unet):
    return dict(unet.attn_processors)


def run_materialising(unet, inputs, **kwargs):
    oracle = MaterializingCrossAttnProcessor(**kwargs)
    originals = set_cross_attention_processor(unet, oracle)
    try:
        out = unet(**inputs).sample
    finally:
        for name, module in unet.named_modules():
            if name in originals:
                module.set_processor(originals[name])
    return out, oracle


@pytest.mark.parametrize("kind", KINDS)
def test_unet_output_matches_default_processors(unets, kind):
    unet, inputs = unets[kind], unet_inputs(kind)
    with torch.no_grad():
        expected = unet(**inputs).sample
        with fmn.use_fused_attention(unet, backend=REF):
            got = unet(**inputs).sample
    assert (got - expected).abs().max() <= 1e-5


def test_encoder_attention_mask_matches_default(unets):
    unet, inputs = unets["sd1"], unet_inputs("sd1")
    keep = torch.ones(2, 77)
    keep[0, 10:] = 0
    keep[1, 40:] = 0
    inputs["encoder_attention_mask"] = keep
    with torch.no_grad():
        expected = unet(**inputs).sample
        unmasked = unet(**{**inputs, "encoder_attention_mask": None}).sample
        with fmn.use_fused_attention(unet, backend=REF):
            got = unet(**inputs).sample
    assert (got - expected).abs().max() <= 1e-5 < (unmasked - expected).abs().max()


def branchy_attention(qk_norm):
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=True,
                     norm_num_groups=8, spatial_norm_dim=4, cross_attention_norm="layer_norm",
                     qk_norm=qk_norm, residual_connection=True, rescale_output_factor=2.0).eval()


def branchy_inputs(mask_kind):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 32, 4, 4, generator=g)  # 4-D input, 16 query rows
    context = torch.randn(2, 77, 24, generator=g)
    temb = torch.randn(2, 4, 2, 2, generator=g)  # SpatialNorm's zq
    if mask_kind is None:
        mask = None
    elif mask_kind == "key_bias":  # what UNet2DConditionModel makes of encoder_attention_mask
        mask = torch.zeros(2, 1, 77)
        mask[0, 0, 30:] = -10000.0
    elif mask_kind == "bool":
        mask = torch.ones(2, 1, 77, dtype=torch.bool)
        mask[1, 0, 50:] = False
    else:  # a general additive bias per query row: the materialising fallback
        mask = torch.randn(2, 16, 77, generator=g)
    return dict(hidden_states=hidden, encoder_hidden_states=context, attention_mask=mask, temb=temb)


@pytest.mark.parametrize("mask_kind", [None, "key_bias", "bool", "general_bias"])
@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_every_processor_branch_matches_attn_processor_2_0(mask_kind, qk_norm):
    attn, inputs = branchy_attention(qk_norm), branchy_inputs(mask_kind)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(**inputs)
        attn.set_processor(fa.FusedCrossAttnProcessor(backend=REF))
        got = attn(**inputs)
    assert got.shape == expected.shape == (2, 32, 4, 4)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("mask_kind", [None, "key_bias", "general_bias"])
def test_standalone_scores_and_zeroing_match_materialising(mask_kind):
    attn, inputs = branchy_attention(None), branchy_inputs(mask_kind)
    mask = concept_mask()
    context = fa.AttentionContext(concept_weights=mask, recorder=fa.ConceptScores())
    fused = fa.FusedCrossAttnProcessor(name="x", backend=REF, context=context)
    attn.set_processor(fused)
    attn(**inputs)
    oracle = MaterializingCrossAttnProcessor(concept_mask=mask)
    attn.set_processor(oracle)
    attn(**inputs)
    torch.testing.assert_close(context.recorder.loss(), oracle.loss(), rtol=1e-5, atol=1e-7)

    fused = fa.FusedCrossAttnProcessor(backend=REF, context=fa.AttentionContext(zero_mask=mask))
    attn.set_processor(fused)
    got = attn(**inputs)
    attn.set_processor(MaterializingCrossAttnProcessor(zero_mask=mask))
    torch.testing.assert_close(got, attn(**inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_matches_materialising_computation(unets, kind):
    unet, inputs, mask = unets[kind], unet_inputs(kind), concept_mask()
    with fmn.concept_scores(unet, mask, backend=REF) as rec:
        out = unet(**inputs).sample
        loss = rec.loss()
    expected_out, oracle = run_materialising(unet, inputs, concept_mask=mask)
    n_layers = len(fa.cross_attention_layers(unet))
    assert len(rec.scores) == len(rec.layers) == n_layers == len(oracle.selected)
    heads = {name: module.heads for name, module in fa.cross_attention_layers(unet)}
    assert sorted(rec.layers) == sorted(heads)
    assert all(s.dtype == torch.float32 and s.shape[:2] == (2, heads[name]) for s, name in zip(rec.scores, rec.layers))
    torch.testing.assert_close(loss, oracle.loss(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, fmn.forgetting_loss(rec.scores))
    assert (out - expected_out).abs().max() <= 1e-5
    # float weights of 0/1 give the same loss as the bool mask
    with fmn.concept_scores(unet, mask.float(), backend=REF) as rec_float:
        unet(**inputs)
    torch.testing.assert_close(rec_float.loss(), loss, rtol=1e-6, atol=0)


def test_gradients_reach_the_unet_and_match(unets):
    unet, inputs, mask = unets["sd1"], unet_inputs("sd1"), concept_mask()
    params = {"conv_in.weight": None, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": None,
              "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q.weight": None,
              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight": None}
    named = dict(unet.named_parameters())
    unet.zero_grad(set_to_none=True)
    with fmn.concept_scores(unet, mask, backend=REF) as rec:
        unet(**inputs)
        rec.loss().backward()
    got = {name: named[name].grad.clone() for name in params}
    unet.zero_grad(set_to_none=True)
    _, oracle = run_materialising(unet, inputs, concept_mask=mask)
    oracle.loss().backward()
    for name in params:
        assert got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], named[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_columns_equals_attention_on_masked_values(unets, kind):
    unet, inputs, mask = unets[kind], unet_inputs(kind), concept_mask()
    with torch.no_grad():
        plain = unet(**inputs).sample
        with fa.zero_columns(unet, mask, backend=REF):
            got = unet(**inputs).sample
        expected, _ = run_materialising(unet, inputs, zero_mask=mask)
    assert (got - expected).abs().max() <= 1e-5 < (got - plain).abs().max()


def test_install_and_remove_restore_exact_processors(pipes):
    pipe = pipes["sd1"]
    before = processors(pipe.unet)
    handle = fmn.use_fused_attention(pipe, backend=REF)
    during = processors(pipe.unet)
    for name, proc in during.items():
        if ".attn2." in name:
            assert isinstance(proc, fa.FusedCrossAttnProcessor)
        else:  # self-attention left alone
            assert proc is before[name]
    assert sum(".attn2." in n for n in during) == len(handle.processors) == 4
    handle.remove()
    assert all(processors(pipe.unet)[n] is p for n, p in before.items())

    with pytest.raises(RuntimeError, match="boom"):
        with fmn.use_fused_attention(pipe.unet, backend=REF):
            raise RuntimeError("boom")
    assert all(processors(pipe.unet)[n] is p for n, p in before.items())

    # concept_scores installs and removes when nothing is installed...
    with fmn.concept_scores(pipe, concept_mask()):
        assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor,
                          fa.FusedCrossAttnProcessor)
    assert all(processors(pipe.unet)[n] is p for n, p in before.items())
    # ...and reuses installed processors, which share one context, putting its settings back.
    with fmn.use_fused_attention(pipe, backend=REF) as handle:
        installed, context = handle.processors, handle.context
        assert all(p.context is context for p in installed)
        with fmn.concept_scores(pipe, concept_mask()), fa.zero_columns(pipe, concept_mask()):
            assert handle.processors == installed
            assert context.concept_weights is not None and context.zero_mask is not None
        assert context.concept_weights is None and context.zero_mask is None and context.recorder is None
    assert all(processors(pipe.unet)[n] is p for n, p in before.items())


def test_bad_input_errors(unets):
    unet, inputs = unets["sd1"], unet_inputs("sd1")
    with fmn.concept_scores(unet, concept_mask(3), backend=REF):
        with pytest.raises(ValueError, match=r"concept_weights has shape \[3, 77\].*batch of 2"):
            unet(**inputs)
    with pytest.raises(TypeError, match="concept_weights"):
        with fmn.concept_scores(unet, [[True] * 77]):
            pass
    with pytest.raises(TypeError, match="zero_mask must be bool"):
        with fa.zero_columns(unet, concept_mask().float()):
            pass
    with pytest.raises(ValueError, match="backend"):
        fmn.use_fused_attention(unet, backend="cuda")
    with pytest.raises(TypeError, match="unet_or_pipe"):
        fmn.use_fused_attention("unet")

    class Custom:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    original = layer.processor
    layer.set_processor(Custom())
    try:
        with pytest.raises(ValueError, match="Custom"):
            fmn.use_fused_attention(unet)
    finally:
        layer.set_processor(original)


def test_forgetting_loss_definition():
    scores = [torch.tensor([[[1.0, 2.0]]], requires_grad=True), torch.tensor([[[6.0]]])]
    loss = fmn.forgetting_loss(scores)
    torch.testing.assert_close(loss, torch.tensor(3.0))
    zero = torch.zeros(1, 2, 3, requires_grad=True)
    loss0 = fmn.forgetting_loss([zero])
    loss0.backward()
    assert loss0.item() == 0 and torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError, match="empty"):
        fmn.forgetting_loss([])
    with pytest.raises(TypeError, match="scores"):
        fmn.forgetting_loss([1.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(unets, dtype):
    unet = unets["sd2"].to(dtype)
    try:
        inputs, mask = unet_inputs("sd2", dtype=dtype), concept_mask()
        with torch.no_grad():
            expected = unet(**inputs).sample.float()
            with fmn.concept_scores(unet, mask, backend=REF) as rec:
                got = unet(**inputs).sample.float()
        assert got.dtype == torch.float32 and all(s.dtype == torch.float32 for s in rec.scores)
        assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
        assert torch.isfinite(rec.loss())
    finally:
        unet.float()


def spy_zero_masks(monkeypatch):
    """The zero mask each cross-attention call of a fused processor sees."""
    seen = []

    def recording(self, *args):
        seen.append(None if self.context.zero_mask is None else self.context.zero_mask.clone())
        return real(self, *args)
    real = fa.FusedCrossAttnProcessor._cross_attention
    monkeypatch.setattr(fa.FusedCrossAttnProcessor, "_cross_attention", recording)
    return seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_suppress_zeroes_conditional_concept_columns(pipes, monkeypatch, kind, guidance):
    pipe = pipes[kind]
    prompts = ["a photo of a cat", "a cat and a dog near a cat"]
    call = dict(prompt=prompts, num_images_per_prompt=2, guidance_scale=guidance, num_inference_steps=2,
                output_type="latent")
    before = processors(pipe.unet)
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images

    seen = spy_zero_masks(monkeypatch)
    with fmn.suppress(pipe, ["cat"], backend=REF):
        suppressed = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert "encode_prompt" not in vars(pipe)
    assert all(processors(pipe.unet)[n] is p for n, p in before.items())

    # Independently built expectation: sample-major repeats, [negative, positive] with guidance.
    expected = torch.zeros(4, 77, dtype=torch.bool)
    expected[0:2, 5] = True
    expected[2:4, [2, 8]] = True
    if guidance > 1:
        expected = torch.cat([torch.zeros_like(expected), expected])
    assert len(seen) == 2 * len(fa.cross_attention_layers(pipe))  # 2 steps, one UNet call each
    assert all(m is not None and torch.equal(m, expected) for m in seen)

    with fa.zero_columns(pipe, expected, backend=REF):
        manual = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(suppressed, manual, rtol=0, atol=0)
    assert (suppressed - plain).abs().max() > 1e-4


def test_suppress_errors_and_single_prompt(pipes):
    pipe = pipes["sd2"]
    call = dict(prompt="a photo of a cat", num_inference_steps=1, output_type="latent")
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    # a batch without the concept is generated as it is; a block in which no call held it warns
    with pytest.warns(UserWarning, match=r"'dog'.*none of the prompts"):
        with fmn.suppress(pipe, "dog", backend=REF):
            same = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)  # fused processor vs SDPA rounding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fmn.suppress(pipe, "dog", backend=REF):
            pipe(**call)
            pipe(**dict(call, prompt="a photo of a dog"))
    with fmn.suppress(pipe, "dog", backend=REF):
        embeds = pipe.encode_prompt("a dog", "cpu", 1, False)[0]
        with pytest.raises(ValueError, match="prompt text"):
            pipe(prompt_embeds=embeds, num_inference_steps=1, output_type="latent")
    assert "encode_prompt" not in vars(pipe)
    with pytest.raises(TypeError, match="pipe"):
        with fmn.suppress(pipe.unet, ["dog"]):
            pass


def test_suppress_mixed_batch_zeroes_only_prompts_with_the_concept(pipes):
    pipe = pipes["sd1"]
    prompts = ["a photo of a cat", "a photo of a dog"]
    kw = dict(num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    seeds = lambda: [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]  # noqa: E731
    plain = pipe(prompt=prompts, generator=seeds(), **kw).images
    with fmn.suppress(pipe, "cat", backend=REF):
        suppressed = pipe(prompt=prompts, generator=seeds(), **kw).images
    assert not torch.allclose(suppressed[0], plain[0])
    torch.testing.assert_close(suppressed[1], plain[1], rtol=1e-5, atol=1e-6)


def test_concept_token_mask_feeds_concept_scores_in_a_guidance_batch(pipes):
    """The trainer's path: spans -> with_guidance -> concept_scores; unconditional rows score 0."""
    pipe = pipes["sd1"]
    mask = with_guidance(concept_token_mask(pipe.tokenizer, ["a photo of a cat"], ["cat"]))
    inputs = unet_inputs("sd1", batch=2)
    with fmn.concept_scores(pipe, mask, backend=REF) as rec:
        pipe.unet(**inputs)
    assert all(s[0].abs().max() == 0 and s[1].abs().max() > 0 for s in rec.scores)


def test_auto_backend(unets):
    """The same parity checks through backend="auto" (Triton; on a CPU under TRITON_INTERPRET=1)."""
    pytest.importorskip("fmn_kernels.ops.cross_attention")
    unet, inputs, mask = unets["sd1"], unet_inputs("sd1"), concept_mask()
    with torch.no_grad():
        expected = unet(**inputs).sample
    with fmn.concept_scores(unet, mask) as rec:
        got = unet(**inputs).sample
        loss = rec.loss()
    expected_loss = run_materialising(unet, inputs, concept_mask=mask)[1].loss()
    assert (got.detach() - expected).abs().max() <= 1e-4
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-4, atol=0)


def test_forgetting_loss_keeps_nan_and_is_zero_at_zero():
    assert torch.isnan(fmn.forgetting_loss([torch.tensor([1.0, float("nan")])]))
    zero = torch.zeros(3, requires_grad=True)
    loss = fmn.forgetting_loss([zero])
    loss.backward()
    assert loss.item() == 0 and torch.equal(zero.grad, torch.zeros(3))
    torch.testing.assert_close(fmn.forgetting_loss([torch.tensor([4.0]), torch.tensor([5.0])]), torch.tensor(3.0))


def test_recording_through_a_handles_context_equals_concept_scores(unets):
    """The trainer's way in: set the installed processors' one context, no layer lookup."""
    unet, inputs, mask = unets["sd1"], unet_inputs("sd1"), concept_mask()
    with fmn.concept_scores(unet, mask, backend=REF) as expected:
        unet(**inputs)
    with fmn.use_fused_attention(unet, backend=REF) as handle:
        with fa.recording(handle.context, mask) as got:
            unet(**inputs)
        assert handle.context.concept_weights is None and handle.context.recorder is None  # put back
    assert got.layers == expected.layers
    torch.testing.assert_close(got.loss(), expected.loss(), rtol=0, atol=0)
