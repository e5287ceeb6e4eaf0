"""Which attention calls take the fused kernel, and what the others compute.

- Calls with neither concept weights nor a zero mask are diffusers' own attention: the fused
  processors' outputs are bit-identical (torch.equal) to AttnProcessor2_0 / JointAttnProcessor2_0 /
  FluxAttnProcessor on tiny random models, with and without masks; the kernel is never called.
- Zeroing alone is SDPA on values with the zeroed columns' rows zeroed: same output and gradients as
  the kernel's post-softmax zeroing (compared with the kernel path, forced by all-zero concept weights).
- No processor call reads a tensor on the host (NoHostReads: any .item(), bool(), int(), .tolist(),
  nonzero, boolean indexing ... raises); on CUDA, torch's sync debug mode checks the same.
"""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.overrides import TorchFunctionMode

import fmn
import fmn.processors.attention as fa
import fmn.processors.mmdit_attention as fm
from fmn.processors.dispatch import zero_columns
from fmn_kernels import cross_attention
from fmn.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_unet

UNET_KINDS = ["sd1", "sd2", "sdxl"]
CONTEXT_DIM = {"sd1": 32, "sd2": 48, "sdxl": 64}
T5_LEN = 12
IMAGE_TOKENS = 16


class NoHostReads(TorchFunctionMode):
    """Raises on every tensor operation that reads device memory on the host (a GPU-to-CPU sync on
    CUDA): scalar conversions, .item/.tolist/.numpy/.cpu, and ops whose output size depends on values."""
    READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu", "nonzero",
             "masked_select", "equal", "allclose", "unique", "unique_consecutive", "argwhere"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS:
            raise AssertionError(f"host read of a tensor: {name}")
        if name == "__getitem__" and _has_bool_tensor(args[1]):
            raise AssertionError("boolean-mask indexing (a host read of the mask)")
        if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                      torch.Tensor) and kwargs.get("output_size") is None:
            raise AssertionError("repeat_interleave with tensor repeats and no output_size")
        return func(*args, **kwargs)


def _has_bool_tensor(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def test_no_host_reads_guard_can_fail():
    t = torch.ones(3)
    for read in (lambda: bool(t.any()), lambda: t.sum().item(), lambda: t[t > 0], lambda: int(t[0]),
                 lambda: t.tolist(), lambda: torch.nonzero(t)):
        with pytest.raises(AssertionError, match="host read|boolean"):
            with NoHostReads():
                read()
    with NoHostReads():  # device-side work passes
        (t * 2).softmax(0).masked_fill(t > 5, 0).sum()


# ---------------------------------------------------------------- UNet: bit-identical dispatch

def unet_inputs(kind, batch=2, seed=0, key_mask=False):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700][:batch]),
                  encoder_hidden_states=torch.randn(batch, 77, CONTEXT_DIM[kind], generator=g))
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g),
                                           time_ids=torch.tensor([[16., 16., 0., 0., 16., 16.]] * batch))
    if key_mask:
        keep = torch.ones(batch, 77)
        keep[0, 10:] = 0
        keep[-1, 40:] = 0
        kwargs["encoder_attention_mask"] = keep
    return kwargs


@pytest.fixture(scope="module")
def unets():
    return {kind: tiny_unet(kind) for kind in UNET_KINDS}


def count_kernel_calls(monkeypatch, module):
    calls = []
    real = module.cross_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("concept_weights") is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "cross_attention", counted)
    return calls


@pytest.mark.parametrize("key_mask", [False, True])
@pytest.mark.parametrize("kind", UNET_KINDS)
def test_unet_without_concept_is_bit_identical_to_diffusers(unets, monkeypatch, kind, key_mask):
    unet, inputs = unets[kind], unet_inputs(kind, key_mask=key_mask)
    calls = count_kernel_calls(monkeypatch, fa)
    with torch.no_grad():
        expected = unet(**inputs).sample
        with fmn.use_fused_attention(unet, backend="reference"):
            got = unet(**inputs).sample
    assert torch.equal(got, expected)
    assert calls == []


def branchy_attention():
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=True, norm_num_groups=8,
                     spatial_norm_dim=4, cross_attention_norm="layer_norm", qk_norm="layer_norm",
                     residual_connection=True, rescale_output_factor=2.0).eval()


def branchy_inputs(mask_kind, cross=True):
    g = torch.Generator().manual_seed(1)
    keys = 77 if cross else 16
    masks = {None: None, "key_bias": torch.zeros(2, 1, keys), "bool": torch.ones(2, 1, keys, dtype=torch.bool),
             "general_bias": torch.randn(2, 16, keys, generator=g)}
    mask = masks[mask_kind]
    if mask_kind == "key_bias":
        mask[0, 0, 7:] = -10000.0
    if mask_kind == "bool":
        mask[1, 0, 5:] = False
    return dict(hidden_states=torch.randn(2, 32, 4, 4, generator=g),
                encoder_hidden_states=torch.randn(2, 77, 24, generator=g) if cross else None,
                attention_mask=mask, temb=torch.randn(2, 4, 2, 2, generator=g))


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "key_bias", "bool", "general_bias"])
def test_every_branch_bit_identical_to_attn_processor_2_0(mask_kind, cross):
    attn, inputs = branchy_attention(), branchy_inputs(mask_kind, cross)
    if not cross:  # self-attention: the layer's own hidden states are the keys
        attn = Attention(query_dim=32, heads=2, dim_head=16, norm_num_groups=8, spatial_norm_dim=4,
                         residual_connection=True).eval()
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(**inputs)
        attn.set_processor(fa.FusedCrossAttnProcessor(backend="reference"))
        got = attn(**inputs)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- MM-DiT: bit-identical dispatch

@pytest.fixture(scope="module")
def transformers():
    return {"sd3": tiny_sd3_pipeline().transformer, "flux": tiny_flux_pipeline().transformer}


def text_len(kind):
    return 77 + T5_LEN if kind == "sd3" else T5_LEN


def transformer_inputs(kind, seed=0, attention_mask=False):
    g = torch.Generator().manual_seed(seed)
    if kind == "sd3":
        return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(2, text_len(kind), 64, generator=g),
                    pooled_projections=torch.randn(2, 64, generator=g),
                    timestep=torch.tensor([500.0, 300.0]), return_dict=False)
    img_ids = torch.zeros(IMAGE_TOKENS, 3)
    img_ids[:, 1] = torch.arange(4).repeat_interleave(4)
    img_ids[:, 2] = torch.arange(4).repeat(4)
    kwargs = dict(hidden_states=torch.randn(2, IMAGE_TOKENS, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, T5_LEN, 64, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.5, 0.3]),
                  img_ids=img_ids, txt_ids=torch.zeros(T5_LEN, 3), guidance=torch.tensor([3.5, 3.5]),
                  return_dict=False)
    if attention_mask:
        keep = torch.ones(2, T5_LEN + IMAGE_TOKENS, dtype=torch.bool)
        keep[1, 4:T5_LEN] = False  # the second prompt's padding
        kwargs["joint_attention_kwargs"] = {"attention_mask": keep}
    return kwargs


@pytest.mark.parametrize("kind,attention_mask", [("sd3", False), ("flux", False), ("flux", True)])
def test_mmdit_without_concept_is_bit_identical_to_diffusers(transformers, monkeypatch, kind, attention_mask):
    transformer, inputs = transformers[kind], transformer_inputs(kind, attention_mask=attention_mask)
    calls = count_kernel_calls(monkeypatch, fm)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        with fmn.use_fused_attention(transformer, backend="reference"):
            got = transformer(**inputs)[0]
            unmasked = transformer(**{k: v for k, v in inputs.items() if k != "joint_attention_kwargs"})[0]
    assert torch.equal(got, expected)
    assert calls == []
    if attention_mask:  # the mask reached the attention
        assert not torch.equal(unmasked, expected)


def zero_text(kind):
    mask = torch.zeros(2, text_len(kind), dtype=torch.bool)
    start = 77 if kind == "sd3" else 0
    mask[0, start + 1:start + 3] = True
    mask[1, start + 5] = True
    if kind == "sd3":
        mask[1, 4] = True
    return mask


def test_kernel_only_with_concept_weights(unets, transformers, monkeypatch):
    unet_calls, mmdit_calls = count_kernel_calls(monkeypatch, fa), count_kernel_calls(monkeypatch, fm)
    zero = torch.zeros(2, 77, dtype=torch.bool)
    zero[:, 3] = True
    unet, inputs = unets["sd1"], unet_inputs("sd1")
    with torch.no_grad():
        with zero_columns(unet, zero, backend="reference"):
            unet(**inputs)
        assert unet_calls == []
        with fmn.concept_scores(unet, zero, backend="reference") as rec:
            unet(**inputs)
        assert unet_calls == [True] * len(fa.cross_attention_layers(unet)) == [True] * len(rec.scores)
        for kind, transformer in transformers.items():
            with zero_columns(transformer, zero_text(kind), backend="reference"):
                transformer(**transformer_inputs(kind))
            assert mmdit_calls == []
            with fmn.concept_scores(transformer, zero_text(kind), backend="reference") as rec:
                transformer(**transformer_inputs(kind))
            assert len(mmdit_calls) == len(rec.scores) > 0
            mmdit_calls.clear()


# ---------------------------------------------------------------- zeroing through SDPA == the kernel's zeroing

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zeroing_via_values_equals_kernel_zeroing(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, s, 16, generator=g, dtype=torch.float32, requires_grad=True)
               for s in (20, 77, 77))
    zero = torch.rand(2, 77, generator=g) < 0.3
    dout = torch.randn(2, 3, 20, 16, generator=g)
    sdpa = F.scaled_dot_product_attention(q, k, v.masked_fill(zero[:, None, :, None], 0))
    grads_sdpa = torch.autograd.grad(sdpa, (q, k, v), dout)
    kernel, _ = cross_attention(q, k, v, zero_mask=zero, backend=backend)
    grads_kernel = torch.autograd.grad(kernel, (q, k, v), dout)
    torch.testing.assert_close(sdpa, kernel, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_sdpa, grads_kernel):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def outputs_and_grads(module, run):
    """run() -> output; the output and the gradients of a fixed projection of it w.r.t. the params."""
    params = [p for p in module.parameters() if p.requires_grad]
    out = run()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), params, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_same(a, b):
    """float64 models: the two computations differ by rounding only."""
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def as_double(inputs):
    """The floating-point tensors of a call's kwargs (nested dicts too) in float64."""
    def cast(v):
        if isinstance(v, dict):
            return as_double(v)
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return {k: cast(v) for k, v in inputs.items()}


def test_unet_zeroing_via_sdpa_equals_kernel_path():
    """Zero mask alone (SDPA on zeroed values) vs zero mask + all-zero concept weights (the kernel)."""
    unet, inputs = tiny_unet("sd2").double(), as_double(unet_inputs("sd2"))
    zero = torch.zeros(2, 77, dtype=torch.bool)
    zero[0, [2, 5]] = True
    zero[1, 9] = True
    with fmn.use_fused_attention(unet, backend="reference") as handle:
        with fa.using(handle.context, zero_mask=zero):
            via_sdpa = outputs_and_grads(unet, lambda: unet(**inputs).sample)
        with fa.using(handle.context, zero_mask=zero, concept_weights=torch.zeros(2, 77).double()):
            via_kernel = outputs_and_grads(unet, lambda: unet(**inputs).sample)
        plain = outputs_and_grads(unet, lambda: unet(**inputs).sample)
    assert_same(via_sdpa, via_kernel)
    assert (via_sdpa[0] - plain[0]).abs().max() > 1e-4  # the zeroing did something


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_mmdit_zeroing_via_sdpa_equals_kernel_path(kind):
    pipe = tiny_sd3_pipeline() if kind == "sd3" else tiny_flux_pipeline()
    transformer, inputs = pipe.transformer.double(), as_double(transformer_inputs(kind))
    zero = zero_text(kind)
    with fmn.use_fused_attention(transformer, backend="reference") as handle:
        with fa.using(handle.context, zero_mask=zero):
            via_sdpa = outputs_and_grads(transformer, lambda: transformer(**inputs)[0])
        with fa.using(handle.context, zero_mask=zero, concept_weights=torch.zeros(2, text_len(kind)).double()):
            via_kernel = outputs_and_grads(transformer, lambda: transformer(**inputs)[0])
        plain = outputs_and_grads(transformer, lambda: transformer(**inputs)[0])
    assert_same(via_sdpa, via_kernel)
    assert (via_sdpa[0] - plain[0]).abs().max() > 1e-4


# ---------------------------------------------------------------- no host reads in processor calls

def guarded_processors(monkeypatch, *classes, guard=NoHostReads):
    """Every __call__ of these processor classes runs inside guard(); returns the call counter."""
    calls = []
    for cls in classes:
        real = cls.__call__

        def guarded(self, *args, _real=real, **kwargs):
            calls.append(type(self).__name__)
            with guard():
                return _real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__call__", guarded)
    return calls


class CudaSyncErrors:
    """torch.cuda's sync debug mode set to "error" inside: a synchronising CUDA call raises."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_unet_processor_calls_read_nothing_on_the_host(unets, monkeypatch, kind):
    unet = unets[kind]
    calls = guarded_processors(monkeypatch, fa.FusedCrossAttnProcessor)
    weights = torch.zeros(2, 77)
    weights[0, 4], weights[1, 7] = 1.0, 0.5
    zero = weights > 0
    with fmn.use_fused_attention(unet, backend="reference") as handle:
        for key_mask in (False, True):
            inputs = unet_inputs(kind, key_mask=key_mask)
            for fields in ({}, {"zero_mask": zero}, {"concept_weights": weights, "recorder": fa.ConceptScores()},
                           {"concept_weights": weights, "zero_mask": zero, "recorder": fa.ConceptScores()}):
                with fa.using(handle.context, **fields):
                    out = unet(**inputs).sample
                    loss = out.square().mean() + (fields["recorder"].loss() if "recorder" in fields else 0)
                with NoHostReads():  # the backward too (the kernels' autograd functions run here)
                    loss.backward()
    assert len(calls) == 8 * len(fa.cross_attention_layers(unet))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_mmdit_processor_calls_read_nothing_on_the_host(transformers, monkeypatch, kind):
    transformer = transformers[kind]
    calls = guarded_processors(monkeypatch, fm.FusedJointAttnProcessor, fm.FusedFluxAttnProcessor)
    zero = zero_text(kind)
    with fmn.use_fused_attention(transformer, backend="reference") as handle:
        for fields in ({}, {"zero_mask": zero}, {"concept_weights": zero.float(), "recorder": fa.ConceptScores()}):
            with fa.using(handle.context, **fields):
                out = transformer(**transformer_inputs(kind))[0]
                loss = out.square().mean() + (fields["recorder"].loss() if "recorder" in fields else 0)
            with NoHostReads():
                loss.backward()
    assert len(calls) == 3 * len(fm.joint_attention_layers(transformer))


def test_joint_masks_made_once_per_call(transformers, monkeypatch):
    transformer = transformers["flux"]
    made = []
    real = fm.FusedFluxAttnProcessor._joint_mask

    def counted(self, name, *args):
        made.append(name)
        return real(self, name, *args)
    monkeypatch.setattr(fm.FusedFluxAttnProcessor, "_joint_mask", counted)
    with torch.no_grad(), fmn.concept_scores(transformer, zero_text("flux"), backend="reference") as rec:
        transformer(**transformer_inputs("flux"))
        transformer(**transformer_inputs("flux"))
    assert len(rec.scores) == 2 * len(fm.joint_attention_layers(transformer))
    assert made == ["concept_weights"]  # one mask, made once for all layers and both calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_processor_calls_do_not_synchronise(monkeypatch):
    """The processors' calls and the whole backward, under torch.cuda's sync debug mode (the kernels
    compiled and warmed up first, outside the check)."""
    unet = tiny_unet("sd2").cuda()
    inputs = {k: v.cuda() for k, v in unet_inputs("sd2", key_mask=True).items()}
    weights = torch.zeros(2, 77, device="cuda")
    weights[:, 4] = 1.0
    cases = ({}, {"zero_mask": weights > 0}, {"concept_weights": weights, "recorder": fa.ConceptScores()})
    with fmn.use_fused_attention(unet) as handle:
        for guarded in (False, True):
            if guarded:
                torch.cuda.synchronize()
                calls = guarded_processors(monkeypatch, fa.FusedCrossAttnProcessor, guard=CudaSyncErrors)
            for key_mask in (None, inputs["encoder_attention_mask"]):
                for fields in cases:
                    with fa.using(handle.context, **{**fields, "recorder": fa.ConceptScores()}) as ctx:
                        out = unet(**{**inputs, "encoder_attention_mask": key_mask}).sample
                        scores = ctx.recorder.scores
                        loss = out.float().square().mean() + (ctx.recorder.loss() if scores else 0)
                    if guarded:
                        with CudaSyncErrors():
                            loss.backward()
                    else:
                        loss.backward()
    assert len(calls) == 6 * len(fa.cross_attention_layers(unet))
