"""The backward without atomics (delta; dK/dV with keys in the dots' M dimension; dQ over query
blocks; the fused one-key-block pass with its split workspace) and the full-block constexprs, under
the interpreter at small sizes: against the float64 oracle (flash-attention's 2x rule), bitwise
repeatable, and the host path's plan cache and eager/compile dispatch.

long_threshold is lowered so the long-sequence tiles run at small N, L; sizes are chosen so that
N and L are multiples of no block (masked tiles) and, in one case, of every block (EVEN_N/EVEN_L).
"""
import pytest
import torch

from fmn_kernels.ops import cross_attention as ops

from attention_checks import make_inputs, make_masks
from test_cross_attention import DEVICE, check_against_oracle, run, triton_fn

ALL_MASKS = ("concept_weights", "zero_mask", "key_mask")

# (B, H, N, L, D), dtype, long_threshold, forced split; every head dim 40..256 appears once or more.
CASES = [
    ((2, 2, 67, 145, 40), torch.bfloat16, 16, None),     # long tiles, ragged, fully masked 2nd sample
    ((1, 2, 70, 150, 80), torch.float16, 16, 2),         # long tiles, split dK/dV workspace
    ((2, 1, 45, 133, 128), torch.float32, 16, None),     # long tiles, exact fp32 dots
    ((1, 1, 30, 140, 160), torch.bfloat16, 16, None),    # D=160 padded to 256
    ((1, 1, 20, 135, 256), torch.float16, 16, None),
    ((2, 1, 37, 77, 64), torch.bfloat16, 1024, 3),       # fused bwd1, split workspace
    ((1, 2, 41, 77, 128), torch.float16, 1024, 3),       # L=77 but D=128: general dK/dV + dQ, split
    ((1, 1, 33, 100, 160), torch.float32, 1024, None),   # general path, D=160
]


@pytest.mark.parametrize("shape, dtype, threshold, split", CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_backward_passes_match_oracle(shape, dtype, threshold, split):
    B, H, N, L, D = shape
    q, k, v = make_inputs(*shape, dtype, seed=21)
    masks = dict(zip(ALL_MASKS, make_masks(B, L, seed=21)))
    check_against_oracle(q, k, v, masks, split=split, long_threshold=threshold)


def test_even_blocks_take_unmasked_tiles():
    """N, L multiples of every block: EVEN_N / EVEN_L set on the long tiles (no row/key masks) and
    still right; D=64 so the head-dim mask folds away too (EVEN_D)."""
    shape = (1, 1, 128, 256, 64)
    q, k, v = make_inputs(*shape, torch.bfloat16, seed=22)
    ops.clear_plans()
    check_against_oracle(q, k, v, dict(concept_weights=make_masks(1, 256, seed=22)[0]), long_threshold=64)
    consts = {launcher.name: launcher.consts for launcher in ops.planned_launchers() if launcher.consts}
    for name in ("fwd_long", "dkdv_long", "dq_long"):
        assert consts[name]["EVEN_N"] and consts[name]["EVEN_L"] and consts[name]["EVEN_D"], name


@pytest.mark.parametrize("threshold, L", [(16, 140), (1024, 77)], ids=["long", "bwd1"])
def test_score_only_and_output_only_gradients(threshold, L):
    """The attention loss alone (no dO, no dV) and the output alone with weights present (no g)."""
    shape = (2, 1, 37, L, 64)
    q, k, v = make_inputs(*shape, torch.float16, seed=23)
    masks = dict(zip(ALL_MASKS, make_masks(2, L, seed=23)))
    check_against_oracle(q, k, v, masks, long_threshold=threshold, use_out=False)
    # output only: the score is returned but unused, so its gradient is None (HAS_G off)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).half()
    got = run(triton_fn(None, threshold), q, k, v, dout, torch.zeros(q.shape[:3]), **masks)
    want = run(triton_fn(None, threshold), q, k, v, dout, torch.zeros(q.shape[:3]),
               zero_mask=masks["zero_mask"], key_mask=masks["key_mask"])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("threshold, L, split", [(16, 150, 3), (1024, 77, 4)], ids=["long", "bwd1"])
def test_backward_is_bitwise_repeatable(threshold, L, split):
    shape = (1, 2, 90, L, 80)
    q, k, v = make_inputs(*shape, torch.float32, seed=24)
    masks = dict(zip(ALL_MASKS, make_masks(1, L, seed=24)))
    g = torch.Generator().manual_seed(3)
    dout, dscore = torch.randn(q.shape, generator=g), torch.randn(q.shape[:3], generator=g)
    first = run(triton_fn(split, threshold), q, k, v, dout, dscore, **masks)
    again = run(triton_fn(split, threshold), q, k, v, dout, dscore, **masks)
    for a, b in zip(first[2], again[2]):
        assert torch.equal(a, b)


def test_plans_are_cached_and_eager_calls_skip_the_custom_op():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_inputs(1, 2, 24, 77, 64, torch.float32, seed=25))
    weights = make_masks(1, 77, seed=25)[0].to(DEVICE)
    ops.clear_plans()
    out, score = ops.concept_attention_triton(q, k, v, 0.125, concept_weights=weights)
    assert type(out.grad_fn).__name__ == "ConceptAttentionBackward"  # the autograd.Function, eager
    (out.sum() + score.sum()).backward()
    plans = (len(ops._FWD_PLANS), len(ops._BWD_PLANS))
    out, score = ops.concept_attention_triton(q, k, v, 0.125, concept_weights=weights)
    (out.sum() + score.sum()).backward()
    assert (len(ops._FWD_PLANS), len(ops._BWD_PLANS)) == plans == (1, 1)
    with torch.no_grad():
        out, _ = ops.concept_attention_triton(q, k, v, 0.125, concept_weights=weights)
    assert out.grad_fn is None and len(ops._FWD_PLANS) == 1


def test_split_count_fills_the_gpu():
    """Few key blocks (L = 77): the query rows are split to give about two programs per SM."""
    plan = ops.Plan(torch.zeros(2, 5, 4096, 64, dtype=torch.float16), 77, ops.LONG_THRESHOLD)
    plan.sm_count = 132
    split, rows = ops.dkdv_split(plan, 32, 128, 0)
    assert 200 <= split * 10 <= 2 * 132 + 10 and rows % 32 == 0 and split * rows >= 4096 > (split - 1) * rows
    assert ops.dkdv_split(plan, 32, 128, 1) == (1, 4096)


@pytest.mark.parametrize("shape, dtype, threshold, use_out", [
    ((2, 2, 70, 150, 64), torch.bfloat16, 16, True),     # ragged N and L (3 key blocks of 64)
    ((2, 1, 128, 256, 64), torch.float16, 16, True),     # full blocks only (EVEN_N, EVEN_L)
    ((2, 1, 67, 150, 80), torch.float16, 16, False),     # the attention loss alone (no dO)
    ((2, 1, 37, 77, 64), torch.bfloat16, 1024, True),    # one key block (fwd1, bwd1)
], ids=["ragged", "even", "score-only", "one-block"])
def test_blocks_without_concept_columns_or_left_out_keys(shape, dtype, threshold, use_out):
    """MM-DiT-like masks: concept columns in a few key blocks only (sample 0: the first block and
    the ragged last one, one weight negative; sample 1: none, so its score is 0) and a key mask that
    is all-True in most blocks. The kernels skip the score's work on blocks without concept columns
    and the key-mask select on blocks whose keys all take part: the results must not change."""
    B, H, N, L, D = shape
    q, k, v = make_inputs(*shape, dtype, seed=24)
    weights = torch.zeros(B, L)
    weights[0, [3, 4, L - 2]] = torch.tensor([1.0, 0.5, -0.7])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[0, 20:23] = False
    key_mask[1, L - 1] = False
    zero_mask = torch.zeros(B, L, dtype=torch.bool)
    zero_mask[:, 7] = True
    masks = dict(concept_weights=weights.to(DEVICE), zero_mask=zero_mask.to(DEVICE), key_mask=key_mask.to(DEVICE))
    out = check_against_oracle(q, k, v, masks, long_threshold=threshold, use_out=use_out)
    assert out[1][1].abs().max().item() == 0.0  # no concept column: no score
