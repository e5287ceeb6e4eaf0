"""fmn_kernels' native CPU backend (backend="cpu") vs float64 autograd on the reference.

Tolerance rule (flash-attention's): the backend's max error against the float64 oracle must be
within 2x the max error of the same computation done by PyTorch in the input dtype, plus a floor of
a few units in the last place of the output's scale (in float32 both errors are rounding noise).
"""
import pytest
import torch

import fmn_kernels.api as api
from fmn_kernels import concept_attention_reference, cross_attention
from fmn_kernels.ops import cpu_attention

from attention_checks import assert_within_rule, make_inputs
from attention_checks import mask_kwargs as make_masks

pytestmark = pytest.mark.skipif(not cpu_attention.cpu_backend_available(),
                                reason="native CPU kernels not built (see scripts/setup.sh)")

# (B, H, N, L, D): N over several 64-row tiles and not a multiple of them; L = 1 / 77 / 154 / 300,
# and 600 (two 512-key tiles: the online-softmax rescaling); D = 40 / 64 / 80 / 160.
SHAPES = [
    (2, 2, 37, 77, 40),
    (1, 2, 150, 300, 64),
    (2, 1, 19, 1, 80),
    (1, 1, 33, 154, 160),
    (2, 3, 1, 77, 64),
    (1, 1, 70, 600, 40),
]


def run(fn, q, k, v, seed=2, use_out=True, use_score=True, **masks):
    """Forward, then the gradients of sum(out * dout) + sum(score * dscore); missing grads as None."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, score = fn(q, k, v, **masks)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    if use_out:
        loss = loss + (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    if use_score and score is not None:
        loss = loss + (score.double() * torch.randn(score.shape, generator=g, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    return out.detach(), None if score is None else score.detach(), grads


def cpu_fn(q, k, v, **masks):
    return cross_attention(q, k, v, backend="cpu", **masks)


def reference_fn(q, k, v, **masks):
    """PyTorch in the inputs' own dtype (float64 inputs: the oracle)."""
    return concept_attention_reference(q, k, v, q.shape[-1] ** -0.5, **masks)


def check_against_oracle(shape, dtype, masks, use_out=True, use_score=True):
    q, k, v = make_inputs(*shape, dtype)
    kw = dict(use_out=use_out, use_score=use_score, **masks)
    got = run(cpu_fn, q, k, v, **kw)
    oracle = run(reference_fn, q.double(), k.double(), v.double(), **kw)
    same_dtype = run(reference_fn, q, k, v, **kw)
    assert_within_rule("out", got[0], oracle[0], same_dtype[0], dtype)
    if got[1] is not None:
        assert_within_rule("score", got[1], oracle[1], same_dtype[1], dtype)
    for name, g, o, s in zip(("dq", "dk", "dv"), got[2], oracle[2], same_dtype[2]):
        assert (g is None) == (o is None), f"{name}: gradient presence differs from the reference"
        if g is not None:
            assert_within_rule(name, g, o, s, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_with_all_masks(shape, dtype):
    check_against_oracle(shape, dtype, make_masks(shape[0], shape[3]))


def test_backward_split_over_threads():
    """One head, 3 threads: the query rows are split over 3 tasks, their dK/dV partials summed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_against_oracle((1, 1, 300, 77, 40), torch.float32, make_masks(1, 77))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("which", ["none", "concept_weights", "zero_mask", "key_mask"])
def test_each_mask_alone(which):
    masks = make_masks(2, 77)
    masks = {} if which == "none" else {which: masks[which]}
    check_against_oracle((2, 2, 70, 77, 64), torch.float32, masks)


@pytest.mark.parametrize("use_out,use_score", [(False, True), (True, False)])
def test_gradients_from_one_output(use_out, use_score):
    """Score alone (the attention loss): v gets no gradient, as with autograd on the reference."""
    check_against_oracle((2, 2, 37, 77, 40), torch.float32, make_masks(2, 77), use_out, use_score)


def test_fully_masked_rows_give_zeros():
    q, k, v = make_inputs(2, 2, 9, 77, 40, torch.float32)
    masks = make_masks(2, 77)
    out, score, grads = run(cpu_fn, q, k, v, **masks)
    assert (out[-1] == 0).all() and (score[-1] == 0).all()
    assert all(torch.isfinite(g).all() and (g[-1] == 0).all() for g in grads)


def test_portable_gemm_matches(monkeypatch):
    """FMN_CPU_GEMM=portable: the plain-loop products used where PyTorch links no BLAS."""
    q, k, v = make_inputs(1, 2, 70, 600, 40, torch.float32)
    masks = make_masks(1, 600)
    blas = run(cpu_fn, q, k, v, **masks)
    monkeypatch.setenv("FMN_CPU_GEMM", "portable")
    portable = run(cpu_fn, q, k, v, **masks)
    for a, b in zip([*blas[:2], *blas[2]], [*portable[:2], *portable[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 2, 37, 77, 40, torch.float32)
    masks = make_masks(2, 77)

    def loss_fn(q, k, v):
        out, score = cross_attention(q, k, v, backend="cpu", **masks)
        return out.square().sum() + score.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss_fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        grads.append(torch.autograd.grad(fn(*leaves), leaves))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


def test_ops_pass_opcheck():
    q, k, v = make_inputs(1, 2, 37, 77, 40, torch.float32)
    masks = make_masks(1, 77)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), masks["concept_weights"],
            (~masks["zero_mask"]).float(), masks["key_mask"].float(), 0.125)
    torch.library.opcheck(torch.ops.fmn.concept_attention_cpu_fwd.default, args)


def test_auto_picks_cpu_without_the_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(api, "TRITON_INTERPRETING", False)
    monkeypatch.setattr(api, "concept_attention_cpu", lambda *a: calls.append(a) or (a[0], None))
    cross_attention(*make_inputs(1, 1, 4, 77, 40, torch.float32))
    assert len(calls) == 1


def test_missing_library_falls_back_or_raises(monkeypatch):
    """Without the library, auto_cpu_backend (called once, at fmn_kernels.api's import) warns and picks
    the reference; backend='cpu' says why it cannot run."""
    monkeypatch.setattr(cpu_attention, "LOAD_ERROR", "library missing (test)")
    with pytest.warns(RuntimeWarning, match="uses the materialising reference"):
        choice = cpu_attention.auto_cpu_backend()
    assert choice == "reference"
    monkeypatch.setattr(api, "TRITON_INTERPRETING", False)
    monkeypatch.setattr(api, "CPU_AUTO_BACKEND", choice)
    q, k, v = make_inputs(1, 1, 4, 77, 40, torch.float32)
    out, _ = cross_attention(q, k, v)
    torch.testing.assert_close(out, reference_fn(q, k, v)[0])
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable: library missing"):
        cross_attention(q, k, v, backend="cpu")


def test_rejects_float64():
    q, k, v = make_inputs(1, 1, 4, 7, 8, torch.float64)
    with pytest.raises(TypeError, match="backend='cpu' supports float32, bfloat16 and float16"):
        cross_attention(q, k, v, backend="cpu")


def test_kernels_run_on_several_threads():
    """at::parallel_for is a header template: built without OpenMP, the kernels ran on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.ops.fmn.cpu_threads_used(8) == 2
    finally:
        torch.set_num_threads(threads)


def test_two_threads_one_split_gradients_in_input_layout():
    """2 threads, 4 heads: one dK/dV split per head, written straight into the gradients, which take
    the inputs' (diffusers') layout, as torch.empty_like gives it, so that autograd copies nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shape = (2, 2, 150, 77, 64)
        check_against_oracle(shape, torch.float32, make_masks(2, 77))
        q, k, v = make_inputs(*shape, torch.float32)
        _, _, grads = run(cpu_fn, q, k, v, **make_masks(2, 77))
        assert [g.stride() for g in grads] == [torch.empty_like(t).stride() for t in (q, k, v)]
    finally:
        torch.set_num_threads(threads)


def test_few_weighted_keys_over_two_key_blocks():
    """The score and its gradient term are summed over the nonzero-weight keys only: a few weights,
    in both 512-key blocks, one on a left-out key and one on a zeroed key."""
    B, L = 2, 600
    masks = make_masks(B, L)
    weights = torch.zeros(B, L)
    weights[:, [3, 4, 530]] = torch.tensor([1.0, 0.5, 2.0])
    masks["key_mask"][0, 4] = False
    masks["zero_mask"][1, 530] = True
    masks["concept_weights"] = weights
    check_against_oracle((B, 2, 70, L, 40), torch.float32, masks)
