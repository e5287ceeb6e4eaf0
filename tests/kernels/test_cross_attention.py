"""fmn_kernels.cross_attention: Triton backend vs the PyTorch reference vs float64 autograd.

Tolerance rule (flash-attention's): the kernel's max error against the float64 oracle must be within
2x the max error of the same computation done by PyTorch in the input dtype, plus a floor of a few
units in the last place of the output's scale (for float32 both errors are rounding noise, and
summation order alone can differ by that much).
float32 follows torch.backends.cuda.matmul.allow_tf32: off (PyTorch's default), exact fp32 dots and
the float32 rule above; on, TF32 dots (10-bit mantissa, as float16), so the comparison is PyTorch
computing in float16 (same mantissa): error within 2x of that plus the floor. Triton's interpreter
does not emulate TF32 (its dots are fp32), so on this CPU machine the TF32 test checks the TF32
code path and host logic against the looser rule; on a GPU (scripts/gpu_check.sh) it checks TF32's
real error.
Tensors are made on the CPU and moved to DEVICE (on_device) before anything is computed: with CUDA
present the kernels, the oracle and PyTorch's same-dtype run all run on the GPU (compiled kernels,
compared there), else on the CPU with the kernels under the interpreter (tests/conftest.py).
The whole file is marked `gpu` (`pytest -m gpu` selects it with test_cross_attention_gpu.py and
test_torch_compile.py): on a CUDA machine it tests the compiled kernels.
"""
import pytest
import torch

import fmn_kernels.api
from fmn_kernels import concept_attention_reference, cross_attention
from fmn_kernels.ops import configs
from fmn_kernels.ops import cross_attention as ops
from fmn_kernels.ops.cross_attention import concept_attention_triton

from attention_checks import assert_within_rule, make_inputs, make_masks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu

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


def on_device(*tensors):
    """The tensors (or a dict of them) on DEVICE: kernel results are compared with the oracle on the device
    they were computed on (the oracle's upstream gradients are made on its inputs' device)."""
    if len(tensors) == 1 and isinstance(tensors[0], dict):
        return {name: t.to(DEVICE) for name, t in tensors[0].items()}
    return tuple(t.to(DEVICE) for t in tensors)


def triton_fn(split=None, long_threshold=ops.LONG_THRESHOLD):
    def fn(q, k, v, scale=None, **masks):
        return concept_attention_triton(q, k, v, scale or q.shape[-1] ** -0.5, dkdv_split=split,
                                        long_threshold=long_threshold, **masks)
    return fn


def reference_fn(upcast):
    def fn(q, k, v, scale=None, **masks):
        return concept_attention_reference(q, k, v, scale or q.shape[-1] ** -0.5, upcast=upcast, **masks)
    return fn


def check_against_oracle(q, k, v, masks, split=None, seed=0, long_threshold=ops.LONG_THRESHOLD, use_out=True,
                         tf32=False):
    """use_out=False: the loss uses the score alone (no dO: the kernels' HAS_DO=False path).
    tf32=True: float32 inputs with TF32 dots allowed, judged against PyTorch in float16.
    Everything runs on DEVICE (inputs moved there first)."""
    q, k, v = on_device(q, k, v)
    masks = on_device(masks)
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.device) * use_out
    dscore = torch.randn(q.shape[:3], generator=g, dtype=torch.float64).to(q.device)
    oracle = run(reference_fn(True), q.double(), k.double(), v.double(), dout, dscore, **masks)
    rule_dtype = torch.float16 if tf32 else dtype
    same_dtype = run(reference_fn(False), q.to(rule_dtype), k.to(rule_dtype), v.to(rule_dtype), dout.to(rule_dtype),
                     dscore.float(), **masks)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        kernel = run(triton_fn(split, long_threshold), q, k, v, dout.to(dtype), dscore.float(), **masks)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert kernel[0].dtype == dtype and kernel[0].shape == q.shape
    assert_within_rule("out", kernel[0], oracle[0], same_dtype[0], rule_dtype)
    if masks.get("concept_weights") is None:
        assert kernel[1] is None
    else:
        assert kernel[1].dtype == torch.float32 and kernel[1].shape == q.shape[:3]
        assert_within_rule("concept_score", kernel[1], oracle[1], same_dtype[1], rule_dtype)
    for name, got, want, pt in zip(("dq", "dk", "dv"), kernel[2], oracle[2], same_dtype[2]):
        assert got.dtype == dtype
        assert_within_rule(name, got, want, pt, rule_dtype)
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
        if deterministic:  # a second run on the same inputs and upstream gradients (check_against_oracle's)
            g = torch.Generator().manual_seed(2)
            dout, dscore = on_device(torch.randn(q.shape, generator=g, dtype=torch.float64),
                                     torch.randn(q.shape[:3], generator=g, dtype=torch.float64))
            again = run(triton_fn(split), *on_device(q, k, v), dout.float(), dscore.float(), **on_device(masks))
            for a, b in zip(first[2], again[2]):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert first[2][1].abs().sum() > 0


def test_empty_concepts_give_zero_score_and_plain_gradients():
    shape = (2, 2, 21, 77, 40)
    q, k, v = on_device(*make_inputs(*shape, torch.float32, seed=7))
    dout, dscore = on_device(torch.randn(q.shape, generator=torch.Generator().manual_seed(1)), torch.ones(q.shape[:3]))
    empty = run(triton_fn(), q, k, v, dout, dscore, concept_weights=torch.zeros(2, 77, device=DEVICE))
    plain = run(triton_fn(), q, k, v, dout, dscore)
    assert torch.equal(empty[1], torch.zeros_like(empty[1]))
    assert plain[1] is None
    torch.testing.assert_close(empty[0], plain[0], rtol=0, atol=0)
    for a, b in zip(empty[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zeroing_equals_attention_on_zeroed_values():
    shape = (2, 2, 30, 77, 64)
    q, k, v = on_device(*make_inputs(*shape, torch.float32, seed=8))
    zero_mask = torch.zeros(2, 77, dtype=torch.bool, device=DEVICE)
    zero_mask[0, 3:5] = True
    zero_mask[1, 10] = True
    out, _ = concept_attention_triton(q, k, v, 64 ** -0.5, zero_mask=zero_mask)
    v_zeroed = v.masked_fill(zero_mask[:, None, :, None], 0.0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v_zeroed)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_plain_attention_matches_sdpa_with_key_mask():
    shape = (2, 3, 50, 154, 80)
    q, k, v = on_device(*make_inputs(*shape, torch.float32, seed=9))
    key_mask, = on_device(torch.rand(2, 154, generator=torch.Generator().manual_seed(0)) < 0.7)
    out, _ = concept_attention_triton(q, k, v, 0.3, key_mask=key_mask)
    sdpa = lambda *t: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        *t, attn_mask=key_mask[:, None, None, :], scale=0.3)
    # The oracle rule, not a fixed atol: over several key blocks the online softmax rounds differently.
    assert_within_rule("out", out, sdpa(q.double(), k.double(), v.double()), sdpa(q, k, v), torch.float32)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    shape = (2, 1, 17, 77, 64)
    q, k, v = on_device(*make_inputs(*shape, torch.float16, seed=10))
    key_mask = torch.ones(2, 77, dtype=torch.bool, device=DEVICE)
    key_mask[1] = False
    weights = torch.ones(2, 77, device=DEVICE)
    out, score, grads = run(triton_fn(), q, k, v, *on_device(torch.ones(q.shape), torch.ones(q.shape[:3])),
                            concept_weights=weights, key_mask=key_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(score[1], torch.zeros_like(score[1]))
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert grads[0][1].abs().max() == 0 and grads[0][0].abs().max() > 0


def test_out_keeps_query_layout():
    q, k, v = on_device(*make_inputs(1, 2, 20, 77, 64, torch.float32))
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
    monkeypatch.setattr(fmn_kernels.api, "TRITON_INTERPRETING", False)  # read once, at import
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
    ("backend", ValueError, "backend must be 'auto', 'triton', 'cpu' or 'reference'"),
    ("negative_scale", ValueError, "scale must be a positive finite number, got -0.1"),
    ("nan_scale", ValueError, "scale must be a positive finite number, got nan"),
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
    elif case == "negative_scale":
        kwargs["scale"] = -0.1
    elif case == "nan_scale":
        kwargs["scale"] = float("nan")
    with pytest.raises(error, match=match):
        cross_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_score_only_loss_gives_v_no_gradient(backend):
    """The attention loss uses the score alone: v (hence to_v) gets no gradient on either backend,
    so an optimiser with weight decay leaves it alone."""
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_inputs(1, 2, 24, 77, 64, torch.float32))
    weights = torch.zeros(1, 77, device=DEVICE)
    weights[:, 4] = 1
    _, score = cross_attention(q, k, v, concept_weights=weights, backend=backend)
    score.sum().backward()
    assert v.grad is None and q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 2, 37, 77, 40), (1, 2, 40, 154, 80)], ids=["fused_bwd", "separate_dq"])
def test_float32_with_tf32_allowed(shape):
    """TF32 dots (allow_tf32=True): within 2x of PyTorch's float16 error (same 10-bit mantissa)."""
    q, k, v = make_inputs(*shape, torch.float32, seed=13)
    weights, zero_mask, key_mask = make_masks(shape[0], shape[3], seed=13)
    check_against_oracle(q, k, v, dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask), tf32=True)


def test_precision_follows_allow_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert ops.precision_class(torch.float32) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert ops.precision_class(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert ops.precision_class(torch.bfloat16) == ops.precision_class(torch.float16) == "16bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "separate_dq"])
def test_long_sequence_path(dtype, deterministic):
    """N, L >= long_threshold (lowered from 1024 to 64 here): big query blocks forward; backward with
    dQ added atomically inside the dK/dV pass (FlashAttention-2, 5 matmuls), or its own pass when
    deterministic. Several key blocks and a ragged last block on both axes. float32 runs with TF32
    allowed: exact fp32 dots take the separate dQ pass (their 3-dot pass spills on GPUs)."""
    shape = (1, 2, 150, 140, 64)
    q, k, v = make_inputs(*shape, dtype, seed=14)
    weights, zero_mask, key_mask = make_masks(1, 140, seed=14)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_oracle(q, k, v, dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask),
                             long_threshold=64, tf32=dtype == torch.float32)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("L", [77, 154], ids=["fused_bwd", "separate_dq"])
def test_score_only_gradients_match_oracle(L):
    """The attention loss alone (no gradient into out): the kernels skip dO and dV (HAS_DO=False)."""
    q, k, v = make_inputs(2, 2, 33, L, 40, torch.float16, seed=15)
    weights, zero_mask, key_mask = make_masks(2, L, seed=15)
    check_against_oracle(q, k, v, dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask),
                         use_out=False)


def test_launch_falls_back_to_a_smaller_tile_and_remembers_it(monkeypatch):
    """A tile over the GPU's limits (Triton raises OutOfResources when loading it) is never seen by
    the user: the next smaller tile is launched, and later calls start from it."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(ops, "_WORKING_TILE", {})
    plan = ops.Plan(torch.zeros(1, 2, 300, 64, dtype=torch.float16), 300, ops.LONG_THRESHOLD)
    tried = []

    def launch_one(tile):
        tried.append(tile)
        if tile.block_m > 16:
            raise OutOfResources(300000, 232448, "shared memory")

    candidates = plan.tiles("dq")
    chosen = ops._launch("dq", plan, {}, candidates, launch_one)
    assert chosen.block_m == 16 and tried[0] == candidates[0] and len(tried) > 1
    tried.clear()
    assert ops._launch("dq", plan, {}, candidates, launch_one) == chosen and tried == [chosen]


def test_tile_table_is_complete_and_fallbacks_shrink():
    for kernel in configs.KERNELS:
        for precision in configs.PRECISIONS:
            for block_d in (16, 32, 64, 128, 256):
                for arch in configs.ARCH_CLASSES:
                    candidates = configs.tiles(kernel, precision, block_d, arch)
                    for bigger, smaller in zip(candidates, candidates[1:]):
                        assert smaller.block_m * max(smaller.block_n, 1) * smaller.num_stages < \
                            bigger.block_m * max(bigger.block_n, 1) * bigger.num_stages
                    if kernel not in ("fwd1", "bwd1", "dkdv_long"):  # the general kernels always exist
                        assert candidates and min(t.block_m for t in candidates) == 16
    assert configs.arch_class(90) == "sm90" and configs.arch_class(80) == "sm80"
    assert configs.arch_class(86) == configs.arch_class(89) == configs.arch_class(75) == "sm86"


def test_vector_width_needs_aligned_strides():
    q = torch.zeros(2, 64, 8, 40, dtype=torch.float16).transpose(1, 2)  # strides multiples of 8 halves
    assert ops.vector_width([q], 2) == 8
    odd = torch.zeros(2, 64, 8, 41, dtype=torch.float16)[..., :40].transpose(1, 2)
    assert ops.vector_width([q, odd], 2) == 1
    assert ops.vector_width([torch.zeros(1, 3, 5, 16)[:, :, 1:]], 4) == 4  # base offset 16 floats: aligned
