"""fmn_kernels.cross_attention: Triton backend vs the PyTorch reference vs float64 autograd.

Tolerance rule (flash-attention's): the kernel's max error against the float64 oracle must be within
2x the max error of the same computation done by PyTorch in the input dtype, plus a floor of a few
units in the last place of the output's scale (for float32 both errors are rounding noise, and
summation order alone can differ by that much).
"""
import pytest
import torch

from fmn_kernels import concept_attention_reference, cross_attention
from fmn_kernels.ops.cross_attention import concept_attention_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, N, L, D): N not a multiple of the 64-row block, L = 1 / 77 / 154 / 300, D = 40 / 64 / 80 / 160.
SHAPES = [
    (2, 2, 37, 77, 40),
    (1, 2, 70, 300, 64),
    (2, 1, 19, 1, 80),
    (1, 1, 33, 154, 160),
    (2, 3, 1, 77, 64),
    (1, 2, 40, 77, 80),
]
FLOOR_ULPS = 8


def make_inputs(B, H, N, L, D, dtype, seed=0):
    """q, k, v laid out as diffusers does (view(B, seq, H, D).transpose(1, 2)), with k, v from one
    fused projection, so none is contiguous in [B, H, seq, D] order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2)
    kv = torch.randn(B, L, 2, H, D, generator=g).to(dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return q, k, v


def make_masks(B, L, seed=0, bool_weights=False):
    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) < 0.5)
    if bool_weights:
        weights = weights > 0
    zero_mask = torch.rand(B, L, generator=g) < 0.25
    key_mask = torch.rand(B, L, generator=g) < 0.8
    key_mask[:, 0] = True
    if B > 1:
        key_mask[-1] = False  # a sample whose keys are all masked: zeros, not NaN
    return weights, zero_mask, key_mask


def run(fn, q, k, v, dout, dscore, **masks):
    """Forward, then the gradients of sum(out * dout) + sum(score * dscore)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, score = fn(q, k, v, **masks)
    loss = (out.to(dout.dtype) * dout).sum()
    if score is not None:
        loss = loss + (score.to(dscore.dtype) * dscore).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, (q, k, v))]
    return out.detach(), None if score is None else score.detach(), grads


def triton_fn(split=None):
    def fn(q, k, v, scale=None, **masks):
        return concept_attention_triton(q, k, v, scale or q.shape[-1] ** -0.5, dkdv_split=split, **masks)
    return fn


def reference_fn(upcast):
    def fn(q, k, v, scale=None, **masks):
        return concept_attention_reference(q, k, v, scale or q.shape[-1] ** -0.5, upcast=upcast, **masks)
    return fn


def assert_within_rule(name, actual, oracle, torch_same_dtype, dtype):
    actual, oracle, torch_same_dtype = actual.double(), oracle.double(), torch_same_dtype.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - oracle).abs().max().item()
    torch_err = (torch_same_dtype - oracle).abs().max().item()
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1e-3)
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


def check_against_oracle(q, k, v, masks, split=None, seed=0):
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.device)
    dscore = torch.randn(q.shape[:3], generator=g, dtype=torch.float64).to(q.device)
    oracle = run(reference_fn(True), q.double(), k.double(), v.double(), dout, dscore, **masks)
    same_dtype = run(reference_fn(False), q, k, v, dout.to(dtype), dscore.float(), **masks)
    kernel = run(triton_fn(split), q, k, v, dout.to(dtype), dscore.float(), **masks)
    assert kernel[0].dtype == dtype and kernel[0].shape == q.shape
    assert_within_rule("out", kernel[0], oracle[0], same_dtype[0], dtype)
    if masks.get("concept_weights") is None:
        assert kernel[1] is None
    else:
        assert kernel[1].dtype == torch.float32 and kernel[1].shape == q.shape[:3]
        assert_within_rule("concept_score", kernel[1], oracle[1], same_dtype[1], dtype)
    for name, got, want, pt in zip(("dq", "dk", "dv"), kernel[2], oracle[2], same_dtype[2]):
        assert got.dtype == dtype
        assert_within_rule(name, got, want, pt, dtype)
    return kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}L{}D{}".format(*s))
def test_matches_oracle_with_all_masks(shape, dtype):
    B, H, N, L, D = shape
    q, k, v = make_inputs(*shape, dtype)
    weights, zero_mask, key_mask = make_masks(B, L)
    check_against_oracle(q, k, v, dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask))


@pytest.mark.parametrize("mask_set", ["none", "weights", "bool_weights", "zero", "key", "weights+zero"])
def test_mask_combinations(mask_set):
    shape = (2, 2, 45, 77, 64)
    q, k, v = make_inputs(*shape, torch.float16, seed=3)
    weights, zero_mask, key_mask = make_masks(2, 77, seed=3, bool_weights=mask_set == "bool_weights")
    masks = {
        "none": {}, "weights": dict(concept_weights=weights), "bool_weights": dict(concept_weights=weights),
        "zero": dict(zero_mask=zero_mask), "key": dict(key_mask=key_mask),
        "weights+zero": dict(concept_weights=weights, zero_mask=zero_mask),
    }[mask_set]
    check_against_oracle(q, k, v, masks)


@pytest.mark.parametrize("L", [77, 154], ids=["fused_dq", "separate_dq"])
@pytest.mark.parametrize("split", [2, 5])
@pytest.mark.parametrize("deterministic", [False, True])
def test_dkdv_split_reductions(split, deterministic, L):
    """Query rows split over programs: atomics, or the deterministic workspace (bitwise repeatable)."""
    shape = (1, 2, 300, L, 64)
    q, k, v = make_inputs(*shape, torch.float32, seed=5)
    weights, zero_mask, key_mask = make_masks(1, L, seed=5)
    masks = dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        first = check_against_oracle(q, k, v, masks, split=split)
        if deterministic:
            dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            again = run(triton_fn(split), q, k, v, dout.float(), torch.zeros(q.shape[:3]), **masks)
            again2 = run(triton_fn(split), q, k, v, dout.float(), torch.zeros(q.shape[:3]), **masks)
            for a, b in zip(again[2], again2[2]):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert first[2][1].abs().sum() > 0


def test_empty_concepts_give_zero_score_and_plain_gradients():
    shape = (2, 2, 21, 77, 40)
    q, k, v = make_inputs(*shape, torch.float32, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    dscore = torch.ones(q.shape[:3])
    empty = run(triton_fn(), q, k, v, dout, dscore, concept_weights=torch.zeros(2, 77))
    plain = run(triton_fn(), q, k, v, dout, dscore)
    assert torch.equal(empty[1], torch.zeros(q.shape[:3]))
    assert plain[1] is None
    torch.testing.assert_close(empty[0], plain[0], rtol=0, atol=0)
    for a, b in zip(empty[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zeroing_equals_attention_on_zeroed_values():
    shape = (2, 2, 30, 77, 64)
    q, k, v = make_inputs(*shape, torch.float32, seed=8)
    zero_mask = torch.zeros(2, 77, dtype=torch.bool)
    zero_mask[0, 3:5] = True
    zero_mask[1, 10] = True
    out, _ = concept_attention_triton(q, k, v, 64 ** -0.5, zero_mask=zero_mask)
    v_zeroed = v.masked_fill(zero_mask[:, None, :, None], 0.0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v_zeroed)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_plain_attention_matches_sdpa_with_key_mask():
    shape = (2, 3, 50, 154, 80)
    q, k, v = make_inputs(*shape, torch.float32, seed=9)
    key_mask = torch.rand(2, 154, generator=torch.Generator().manual_seed(0)) < 0.7
    out, _ = concept_attention_triton(q, k, v, 0.3, key_mask=key_mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                                                scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    shape = (2, 1, 17, 77, 64)
    q, k, v = make_inputs(*shape, torch.float16, seed=10)
    key_mask = torch.ones(2, 77, dtype=torch.bool)
    key_mask[1] = False
    weights = torch.ones(2, 77)
    out, score, grads = run(triton_fn(), q, k, v, torch.ones(q.shape), torch.ones(q.shape[:3]),
                            concept_weights=weights, key_mask=key_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(score[1], torch.zeros_like(score[1]))
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert grads[0][1].abs().max() == 0 and grads[0][0].abs().max() > 0


def test_out_keeps_query_layout():
    q, k, v = make_inputs(1, 2, 20, 77, 64, torch.float32)
    out, _ = concept_attention_triton(q, k, v, 0.125)
    assert out.stride() == q.stride()  # [B, N, H, D] in memory: diffusers' reshape stays a view


def test_reference_gradcheck_float64():
    q, k, v = (t.double().requires_grad_() for t in make_inputs(1, 2, 5, 7, 8, torch.float64))
    weights, zero_mask, key_mask = make_masks(1, 7)

    def fn(q, k, v):
        out, score = concept_attention_reference(q, k, v, 0.5, weights.double(), zero_mask, key_mask)
        return out, score

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_auto_backend_on_cpu_follows_interpreter(monkeypatch):
    q, k, v = make_inputs(1, 1, 8, 77, 64, torch.float32)
    out_ref, _ = cross_attention(q, k, v, backend="reference")
    out_auto, _ = cross_attention(q, k, v)
    torch.testing.assert_close(out_auto, out_ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        cross_attention(q, k, v, backend="triton")


@pytest.mark.parametrize("case, error, match", [
    ("q_3d", ValueError, "q must be 4-D"),
    ("dtype_mismatch", TypeError, "k must have q's dtype"),
    ("int_dtype", TypeError, "q must be float32, float16 or bfloat16"),
    ("head_dim", ValueError, "k must have q's head dim"),
    ("too_big_d", ValueError, r"head dim D must be in \[1, 256\]"),
    ("kv_shape", ValueError, "k and v must have the same shape"),
    ("batch", ValueError, "k and v must have q's batch and heads"),
    ("last_dim_stride", ValueError, "q must have a contiguous last dim"),
    ("weights_shape", ValueError, r"concept_weights must have shape \[B, L\] = \[2, 77\]"),
    ("zero_mask_dtype", TypeError, "zero_mask must be bool"),
    ("key_mask_type", TypeError, "key_mask must be a torch.Tensor"),
    ("backend", ValueError, "backend must be 'auto', 'triton' or 'reference'"),
])
def test_bad_input_names_the_argument(case, error, match):
    q, k, v = make_inputs(2, 2, 4, 77, 64, torch.float32)
    kwargs = {}
    if case == "q_3d":
        q = q[0]
    elif case == "dtype_mismatch":
        k = k.half()
    elif case == "int_dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "head_dim":
        k, v = k[..., :32], v[..., :32]
    elif case == "too_big_d":
        q, k, v = make_inputs(2, 2, 4, 77, 264, torch.float32)
    elif case == "kv_shape":
        v = v[:, :, :70]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "last_dim_stride":
        q = torch.randn(2, 2, 64, 4).transpose(-1, -2)
    elif case == "weights_shape":
        kwargs["concept_weights"] = torch.ones(2, 76)
    elif case == "zero_mask_dtype":
        kwargs["zero_mask"] = torch.ones(2, 77)
    elif case == "key_mask_type":
        kwargs["key_mask"] = [True] * 77
    elif case == "backend":
        kwargs["backend"] = "cuda"
    with pytest.raises(error, match=match):
        cross_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_score_only_loss_gives_v_no_gradient(backend):
    """The attention loss uses the score alone: v (hence to_v) gets no gradient on either backend,
    so an optimiser with weight decay leaves it alone."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 24, 77, 64, torch.float32))
    weights = torch.zeros(1, 77)
    weights[:, 4] = 1
    _, score = cross_attention(q, k, v, concept_weights=weights, backend=backend)
    score.sum().backward()
    assert v.grad is None and q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
