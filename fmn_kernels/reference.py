"""Plain PyTorch concept attention: materialises the N x L probability map.

The oracle for the Triton kernels and the CPU path. Math (per batch b, head h, row i):
    p_ij = softmax_j(scale * q_i . k_j)   over keys with key_mask_j = True
    o_i  = sum_j (1 - z_j) p_ij v_j         zero_mask z: zeroed after softmax, no renormalisation
    c_i  = sum_j w_j p_ij^2                 concept score, w = concept_weights
Rows whose keys are all masked give o_i = 0 and c_i = 0.
"""
import torch


def concept_attention_reference(q, k, v, scale, concept_weights=None, zero_mask=None,
                                key_mask=None, upcast=False):
    """Returns (out [B,H,N,D] in q's dtype, concept score [B,H,N] float32 or None).

    With upcast=True the math runs in float32 (float64 inputs stay float64), as flash-attention's
    reference does; otherwise in the input dtype, which gives the "PyTorch in the same dtype"
    error that the kernel tests compare against. The score is float32, or float64 for float64
    inputs so that it can serve as a float64 oracle.
    """
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        valid = key_mask[:, None, None, :].to(torch.bool)
        # finfo.min instead of -inf keeps fully masked rows finite (uniform), zeroed below.
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        probs = probs * valid
    kept = probs if zero_mask is None else probs * (~zero_mask.to(torch.bool))[:, None, None, :]
    out = torch.matmul(kept.to(v.dtype), v).to(dtype)
    score = None
    if concept_weights is not None:
        score = _ConceptScore.apply(probs, concept_weights)
    return out, score


# Rows of P turned into float32 at a time by the score: bounds the temporary to ~16 MiB.
_SCORE_CHUNK_ELEMENTS = 1 << 22


class _ConceptScore(torch.autograd.Function):
    """c = sum_j w_j p_ij^2 in float32 (float64 for float64 P), without a full-size float32 copy of P.

    Autograd through `probs.float().square()` would keep a float32 copy of P for the backward
    (2x P's size in bf16/fp16) and build two more in the forward; here the forward converts a
    bounded chunk of rows at a time and the backward, 2 g_i w_j p_ij, reuses P itself, which the
    attention's own backward keeps anyway.
    """

    @staticmethod
    def forward(ctx, probs, weights):
        acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
        w = weights.to(acc)[:, None, None, :]
        B, H, N, L = probs.shape
        rows = max(1, _SCORE_CHUNK_ELEMENTS // max(1, B * H * L))
        score = torch.cat([(probs[:, :, i:i + rows].to(acc).square() * w).sum(-1) for i in range(0, N, rows)], dim=2)
        ctx.save_for_backward(probs, weights)
        return score

    @staticmethod
    def backward(ctx, grad_score):
        probs, weights = ctx.saved_tensors
        w = weights.to(probs.dtype)[:, None, None, :]
        grad_probs = probs * w * (2 * grad_score).to(probs.dtype)[..., None]
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = (probs.to(grad_score.dtype).square() * grad_score[..., None]).sum((1, 2))
        return grad_probs, grad_weights
