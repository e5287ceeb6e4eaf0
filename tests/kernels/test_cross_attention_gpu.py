"""GPU-only checks of the compiled kernels at real SD shapes (skipped without CUDA).

Same oracle and tolerance rule as test_cross_attention.py; here the kernels are compiled for the
GPU instead of interpreted, the dK/dV split is picked from the GPU's SM count, and shapes are the
SD 1.5 / 2.1 / SDXL cross-attention ones plus a long joint-attention case. Inputs, oracle and kernel
results all live on the GPU (check_against_oracle compares them there). Run with `pytest -m gpu`.
"""
import pytest
import torch

from attention_checks import make_inputs, make_masks
from test_cross_attention import DTYPES, check_against_oracle

# Real SD shapes: under Triton's interpreter one case takes many minutes, so without CUDA these skip; the same
# checks at small shapes run on the CPU in test_cross_attention.py.
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (real SD shapes; small ones: test_cross_attention.py)")]

GPU_SHAPES = [
    (2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160), (2, 5, 4096, 77, 64),
    (2, 20, 64, 77, 64), (1, 4, 1000, 300, 128), (1, 2, 4608, 4608, 128), (1, 2, 333, 154, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}H{}N{}L{}D{}".format(*s))
def test_gpu_matches_oracle(shape, dtype):
    B, H, N, L, D = shape
    q, k, v = (t.cuda() for t in make_inputs(*shape, dtype))
    weights, zero_mask, key_mask = (t.cuda() for t in make_masks(B, L))
    check_against_oracle(q, k, v, dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask))


def test_gpu_deterministic_backward_is_bitwise_repeatable():
    q, k, v = (t.cuda().requires_grad_() for t in make_inputs(2, 5, 4096, 77, 64, torch.float16))
    weights = torch.zeros(2, 77, device="cuda")
    weights[:, 5:7] = 1
    from fmn_kernels import cross_attention

    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            out, score = cross_attention(q, k, v, concept_weights=weights)
            grads.append(torch.autograd.grad(out.float().square().sum() + score.sum(), (q, k, v)))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 5, 4096, 77, 64), (1, 2, 4608, 4608, 128)], ids=["sd21", "joint"])
def test_gpu_float32_with_tf32_dots(shape):
    """allow_tf32=True: TF32 tensor-core dots, within 2x of PyTorch's float16 error (same 10-bit mantissa).
    Triton's interpreter computes these dots in full fp32, so only a GPU tests TF32's real rounding."""
    q, k, v = make_inputs(*shape, torch.float32, seed=13)
    weights, zero_mask, key_mask = make_masks(shape[0], shape[3], seed=13)
    check_against_oracle(q, k, v, dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask), tf32=True)


def test_gpu_more_than_65535_batch_heads():
    """B * H = 70000 is over CUDA's limit for grid axes 1 and 2: it sits on axis 0, so this launches."""
    q, k, v = make_inputs(2, 35000, 16, 16, 16, torch.float16, seed=6)
    weights, _, key_mask = make_masks(2, 16, seed=6)
    check_against_oracle(q, k, v, dict(concept_weights=weights, key_mask=key_mask))
