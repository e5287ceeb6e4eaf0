"""CUDA graphs for the training steps, on a GPU (skipped without CUDA).

The capture must succeed (no fallback) on fmn's own processors and Triton kernels, and the graphed
run must match the eager one. Tolerances: a graphed call against the same eager call, fp32: outputs,
scores and gradients within rtol 1e-4 / atol 1e-5 (the same kernels replayed; only atomics may
reorder sums); a whole forget run, graphs on against off: the per-step losses within 1e-3 relative
(fp32) / 2e-2 (bf16 autocast), every patch tensor within 1% relative (Frobenius norm) fp32 / 5% bf16.
"""
import pytest
import torch

import fmn.forgetting.cuda_graphs as cg
from fmn.processors.attention import ConceptScores, using
from fmn.processors.dispatch import use_fused_attention
from fmn.testing import tiny_sd_pipeline, tiny_unet
from fmn.forgetting.trainer import forget

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def call_inputs(seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g).to(device),
                timestep=torch.tensor([10 + seed, 700]).to(device),
                encoder_hidden_states=torch.randn(2, 77, 48, generator=g).to(device))


def recorded_call(model, context, call, weights, trainable):
    recorder = ConceptScores()
    with using(context, concept_weights=weights, recorder=recorder):
        out = model(**call).sample
    loss = recorder.loss() + 0.1 * out.float().square().mean()
    grads = torch.autograd.grad(loss, trainable)
    return [out.detach().clone()] + [s.detach().clone() for s in recorder.scores] + [g.clone() for g in grads]


def test_graphed_calls_match_eager_calls():
    unet = tiny_unet("sd2").cuda()
    unet.requires_grad_(False)
    trainable = [p.requires_grad_(True) for n, p in unet.named_parameters() if ".attn2." in n]
    weights = torch.zeros(2, 77, dtype=torch.bool, device="cuda")
    weights[0, 4], weights[1, 9] = True, True
    with use_fused_attention(unet) as handle:
        graphed = cg.GraphedDenoiser(unet, handle.context)
        for seed in range(3):  # capture on the first call, replays after, each on new inputs
            call = call_inputs(seed)
            expected = recorded_call(unet, handle.context, call, weights, trainable)
            got = recorded_call(graphed, handle.context, call, weights, trainable)
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert graphed.failure is None, graphed.failure  # captured, not the eager fallback
    assert len(graphed.graphs) == 1 and graphed.replays == 3


def run(pipe, graphs, **options):
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return forget(pipe, "cat", images=latents, steps=6, lr=1e-3, progress=False, gen_steps=1, device="cuda",
                  cuda_graphs=graphs, **options)


@pytest.mark.parametrize("precision,loss", [("fp32", "attention"), ("fp32", "both"), ("bf16", "attention")])
def test_forget_with_graphs_matches_eager(precision, loss):
    pipe = tiny_sd_pipeline("sd2")
    graphed = run(pipe, True, precision=precision, loss=loss)
    eager = run(pipe, False, precision=precision, loss=loss)
    assert graphed.summary["cuda_graphs"].startswith("on (1 graphs, 6 replays)"), graphed.summary["cuda_graphs"]
    assert eager.summary["cuda_graphs"].startswith("off (turned off")
    loss_tol, patch_tol = (1e-3, 1e-2) if precision == "fp32" else (2e-2, 5e-2)
    torch.testing.assert_close(torch.tensor(graphed.summary["losses"]), torch.tensor(eager.summary["losses"]),
                               rtol=loss_tol, atol=1e-6)
    assert graphed.tensors.keys() == eager.tensors.keys() and eager.tensors
    for name, b in eager.tensors.items():
        a, b = graphed.tensors[name].float(), b.float()
        assert (a - b).norm() <= patch_tol * b.norm() + 1e-8, name
