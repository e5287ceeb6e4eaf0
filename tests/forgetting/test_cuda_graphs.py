"""fmn.cuda_graphs on the CPU: when a run uses CUDA graphs, the flag, the captured call's plumbing
(arguments, masks, recorded scores, outputs, gradients; exercised with an identity "capture" that
runs the captured module as it is) and the fallback when a capture fails. The capture itself and
its match with the eager run need CUDA: tests/forgetting/test_cuda_graphs_gpu.py."""
import warnings

import pytest
import torch

import fmn.forgetting.cuda_graphs as cg
import fmn.forgetting.trainer as trainer
from fmn.processors.attention import ConceptScores, using
from fmn.cli.commands import build_parser
from fmn.processors.dispatch import use_fused_attention
from fmn.forgetting.options import ForgetOptions
from fmn.testing import tiny_flux_pipeline, tiny_sd_pipeline, tiny_unet

FAST = dict(steps=3, lr=1e-3, backend="reference", progress=False, gen_steps=1, n_images=2)


def identity_capture(calls):
    def capture(module, sample_args):
        calls.append(tuple(t.shape for t in sample_args))
        return module
    return capture


def failing_capture(calls):
    def capture(module, sample_args):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
    return capture


def test_unavailable_reasons():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cg.unavailable(ForgetOptions(), cuda) is None
    assert "turned off" in cg.unavailable(ForgetOptions(cuda_graphs=False), cuda)
    assert "needs CUDA" in cg.unavailable(ForgetOptions(), cpu)
    assert "several processes" in cg.unavailable(ForgetOptions(), cuda, processes=2)
    assert "checkpointing" in cg.unavailable(ForgetOptions(gradient_checkpointing=True), cuda)


def test_option_and_cli_flag():
    assert ForgetOptions().cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        ForgetOptions(cuda_graphs="no")
    assert "cuda_graphs" not in ForgetOptions().record()  # how it ran, not what was trained
    parser = build_parser()
    assert parser.parse_args(["forget", "--concept", "c", "--out", "x.safetensors"]).no_cuda_graphs is False
    assert parser.parse_args(["forget", "--concept", "c", "--out", "x.safetensors", "--no-cuda-graphs"]).no_cuda_graphs


def test_cli_flag_reaches_the_run(sd1_folder, tmp_path, monkeypatch):
    from fmn.cli.commands import main
    from helpers import FAST_CLI
    seen = []
    real = trainer.train_steps

    def spy(family, accel, opts, *args):
        seen.append(opts.cuda_graphs)
        return real(family, accel, opts, *args)
    monkeypatch.setattr(trainer, "train_steps", spy)
    for flag in ([], ["--no-cuda-graphs"]):
        out = tmp_path / f"p{len(seen)}.safetensors"
        assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI, *flag]) == 0
    assert seen == [True, False]


# ---------------------------------------------------------------- the captured call's plumbing

def sdxl_call(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700][:batch]),
                encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, 32, generator=g),
                                       time_ids=torch.tensor([[16., 16., 0., 0., 16., 16.]] * batch)))


def concept_weights(batch=2):
    w = torch.zeros(batch, 77, dtype=torch.bool)
    w[0, 4] = True
    w[-1, [2, 9]] = True
    return w


def run_call(model, context, call, weights, trainable):
    """One recorded call: (output, scores, layers, gradients of loss(out, scores) w.r.t. trainable)."""
    recorder = ConceptScores()
    with using(context, concept_weights=weights, recorder=recorder):
        out = model(**call).sample
    loss = recorder.loss() + 0.1 * out.square().mean()
    grads = torch.autograd.grad(loss, trainable)
    return out.detach(), [s.detach() for s in recorder.scores], list(recorder.layers), grads


@pytest.fixture(scope="module")
def sdxl_unet():
    unet = tiny_unet("sdxl")
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():
        if ".attn2." in name:
            p.requires_grad_(True)
    return unet


def test_replayed_call_matches_eager_call(sdxl_unet):
    unet = sdxl_unet
    trainable = [p for p in unet.parameters() if p.requires_grad]
    captures = []
    with use_fused_attention(unet, backend="reference") as handle:
        graphed = cg.GraphedDenoiser(unet, handle.context, capture=identity_capture(captures))
        for seed in (0, 1):  # the second call replays the first call's capture
            call, weights = sdxl_call(seed=seed), concept_weights()
            eager = run_call(unet, handle.context, call, weights, trainable)
            got = run_call(graphed, handle.context, call, weights, trainable)
            torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
            assert got[2] == eager[2] and len(got[1]) == len(eager[2]) > 0
            for a, b in zip(got[1] + list(got[3]), eager[1] + list(eager[3])):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(captures) == 1 and graphed.replays == 2
        # 4 call tensors (sample, timestep, encoder states, text_embeds, time_ids: 5) + the concept weights
        assert len(captures[0]) == 6
        assert handle.context.recorder is None and handle.context.concept_weights is None  # put back


def test_signatures_no_grad_and_limit(sdxl_unet):
    unet = sdxl_unet
    captures = []
    with use_fused_attention(unet, backend="reference") as handle:
        graphed = cg.GraphedDenoiser(unet, handle.context, capture=identity_capture(captures), max_graphs=2)
        graphed(**sdxl_call())
        graphed(**sdxl_call(seed=3))                    # same signature: replayed
        with torch.no_grad():
            graphed(**sdxl_call(batch=1))               # no gradient: eager, not captured
        with using(handle.context, concept_weights=concept_weights(), recorder=ConceptScores()):
            graphed(**sdxl_call())                      # recording: another signature
        graphed(**sdxl_call(batch=1))                   # a third signature: over max_graphs, eager
        call = sdxl_call()
        graphed(call.pop("sample"), 10, **{k: v for k, v in call.items() if k != "timestep"})  # int timestep:
        # a new signature, over the limit: eager
    assert len(captures) == 2 and graphed.replays == 3
    assert graphed.status() == "on (2 graphs, 3 replays)"


def test_detached_recorded_output_and_flux_tuple_output():
    pipe = tiny_flux_pipeline()
    transformer = pipe.transformer
    call = dict(hidden_states=torch.randn(2, 16, 16), encoder_hidden_states=torch.randn(2, 12, 64),
                pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.3]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(12, 3), guidance=torch.tensor([3.5, 3.5]),
                return_dict=False)
    weights = torch.zeros(2, 12, dtype=torch.bool)
    weights[:, 3] = True
    with use_fused_attention(transformer, backend="reference") as handle:
        graphed = cg.GraphedDenoiser(transformer, handle.context, detach_recorded_output=True,
                                     capture=identity_capture([]))
        with using(handle.context, concept_weights=weights, recorder=ConceptScores()) as ctx:
            out = graphed(**call)
            scores = list(ctx.recorder.scores)
        with using(handle.context, concept_weights=weights, recorder=ConceptScores()) as ctx:
            expected = transformer(**call)
        plain = graphed(**call)  # not recording: the output keeps its gradient
    assert isinstance(out, tuple) and len(out) == len(expected) == 1
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    assert not out[0].requires_grad and all(s.requires_grad for s in scores) and plain[0].requires_grad


def test_failed_capture_warns_once_and_runs_eagerly(sdxl_unet):
    unet = sdxl_unet
    attempts = []
    with use_fused_attention(unet, backend="reference") as handle:
        graphed = cg.GraphedDenoiser(unet, handle.context, capture=failing_capture(attempts))
        with pytest.warns(UserWarning, match="CUDA graph capture failed .*RuntimeError: operation not permitted"):
            first = graphed(**sdxl_call()).sample
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = graphed(**sdxl_call()).sample
        expected = unet(**sdxl_call()).sample
    assert attempts == [1]
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert graphed.status().startswith("failed at capture, ran eagerly (RuntimeError")
    assert "second line" not in graphed.status()


# ---------------------------------------------------------------- the trainer's use

@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_pipeline("sd1")


def forget_with(pipe, monkeypatch, capture, **options):
    """A forget run on the CPU with CUDA graphs "available" and `capture` standing in for torch's."""
    if capture is not None:
        monkeypatch.setattr(trainer, "unavailable", lambda opts, device, processes=1: None)
        monkeypatch.setattr(cg, "capture_graphs", capture)
    try:
        return trainer.forget(pipe, "cat", images=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                              **FAST, **options)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("loss", ["attention", "both"])
def test_trainer_through_graphed_calls_matches_eager(sd1, monkeypatch, loss):
    eager = forget_with(sd1, monkeypatch, None, loss=loss)
    captures = []
    graphed = forget_with(sd1, monkeypatch, identity_capture(captures), loss=loss)
    assert eager.summary["cuda_graphs"] == "off (needs CUDA, the run is on cpu)"
    assert graphed.summary["cuda_graphs"] == f"on (1 graphs, {FAST['steps']} replays)"
    assert len(captures) == 1
    assert graphed.summary["losses"] == eager.summary["losses"]
    assert eager.tensors.keys() == graphed.tensors.keys() and eager.tensors
    for k in eager.tensors:
        assert torch.equal(eager.tensors[k], graphed.tensors[k]), k


def test_trainer_with_failing_capture_warns_and_matches_eager(sd1, monkeypatch):
    eager = forget_with(sd1, monkeypatch, None)
    attempts = []
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        fallback = forget_with(sd1, monkeypatch, failing_capture(attempts))
    assert attempts == [1]
    assert fallback.summary["cuda_graphs"].startswith("failed at capture, ran eagerly")
    assert fallback.summary["losses"] == eager.summary["losses"]
    for k in eager.tensors:
        assert torch.equal(eager.tensors[k], fallback.tensors[k]), k


def test_turned_off_is_never_attempted(sd1, monkeypatch):
    attempts = []
    monkeypatch.setattr(cg, "capture_graphs", failing_capture(attempts))
    patch = trainer.forget(sd1, "cat", images=torch.randn(2, 4, 8, 8), cuda_graphs=False, **FAST)
    assert attempts == [] and patch.summary["cuda_graphs"] == "off (turned off (cuda_graphs=False))"
