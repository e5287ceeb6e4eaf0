"""The forgetting run on tiny offline pipelines: the loss falls, the concept's attention falls on
held-out prompts, every trainable set / loss / option runs, the pipeline is restored, bad input
is refused."""
import copy

import pytest
import torch
from PIL import Image

import fmn.trainer as F
from fmn.attention import FusedCrossAttnProcessor, concept_scores
from fmn.trainer import ForgetError, encode_text, forget
from fmn.spans import concept_token_mask
from fmn.testing import tiny_sd_pipeline

FAST = dict(steps=2, lr=1e-3, backend="reference", progress=False, gen_steps=1)




def latents(n=2, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_pipeline("sd1")


def state(pipe):
    """Everything forget must give back: weights, processors, flags, modes, devices."""
    unet = pipe.unet
    return ({k: v.detach().clone() for k, v in unet.state_dict().items()},
            {n: type(m.processor).__name__ for n, m in unet.named_modules() if hasattr(m, "processor")},
            {n: p.requires_grad for n, p in unet.named_parameters()},
            unet.training, getattr(unet, "is_gradient_checkpointing", False), len(pipe.tokenizer),
            pipe.text_encoder.get_input_embeddings().weight.shape)


def assert_restored(pipe, before):
    after = state(pipe)
    w0, w1 = before[0], after[0]
    assert w0.keys() == w1.keys(), "the UNet's parameter names changed (adapter left behind?)"
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "weights were not restored"
    assert before[1:] == after[1:]


def held_out_score(pipe, prompts, concept, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 8, 8, generator=g)
    t = torch.linspace(100, 900, len(prompts)).long()
    emb, _ = encode_text(pipe, prompts)
    mask = concept_token_mask(pipe.tokenizer, prompts, [concept])
    with torch.no_grad(), concept_scores(pipe.unet, mask, backend="reference") as rec:
        out = pipe.unet(x, t, encoder_hidden_states=emb).sample
    return rec.loss().item(), out


def test_loss_falls_and_held_out_concept_attention_falls(sd1):
    pipe = copy.deepcopy(sd1)
    patch = forget(pipe, "cat", images=latents(4), inplace=True,
                   **{**FAST, "steps": 20, "lr": 2e-4, "template": ["a photo of {}", "a drawing of a {}"]})
    s = patch.summary
    assert len(s["losses"]) == 20 and all(map(lambda v: v == v, s["losses"]))
    assert s["loss_after"] < 0.9 * s["loss_before"]
    first, last = sum(s["losses"][:5]) / 5, sum(s["losses"][-5:]) / 5
    assert last < first
    held = ["a painting of a cat", "a cat on a sofa", "cat"]  # not among the training templates
    before, _ = held_out_score(sd1, held, "cat")
    after, _ = held_out_score(pipe, held, "cat")
    assert after < 0.9 * before
    # other prompts' UNet outputs move by less than the concept's attention falls
    other = ["a photo of a dog", "a red car", "a painting of a house"]
    _, o0 = held_out_score(sd1, other, "a")
    _, o1 = held_out_score(pipe, other, "a")
    moved = ((o1 - o0).norm() / o0.norm()).item()
    assert moved < 0.75 * (1 - after / before), (moved, after / before)


def test_retain_holds_the_retained_concepts_outputs(sd1):
    """retain=["dog"]: the UNet's outputs on dog prompts move far less than without it, while the
    concept's attention loss still falls."""
    kw = {**FAST, "steps": 20, "lr": 2e-4, "template": ["a photo of {}", "a drawing of a {}"]}
    dog = ["a photo of dog", "a drawing of a dog"]
    _, o0 = held_out_score(sd1, dog, "dog")
    moved = {}
    for retain in ((), ("dog",)):
        pipe = copy.deepcopy(sd1)
        patch = forget(pipe, "cat", images=latents(4), inplace=True, retain=retain, retain_weight=10.0, **kw)
        s = patch.summary
        assert s["loss_after"] < 0.9 * s["loss_before"]
        _, o1 = held_out_score(pipe, dog, "dog")
        moved[retain] = ((o1 - o0).norm() / o0.norm()).item()
        if retain:
            assert len(s["retain_losses"]) == 20 and s["retain_loss_after"] >= 0
        else:
            assert s["retain_losses"] is None and s["retain_loss_after"] is None
    assert moved[("dog",)] < 0.5 * moved[()], moved


def test_bad_retain_options_are_refused(sd1):
    with pytest.raises(ValueError, match="retain names concepts being forgotten: \\['cat'\\]"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), retain=["dog", "cat"], **FAST)
    with pytest.raises(ValueError, match="retain must be a list of non-empty phrases"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), retain=["dog", ""], **FAST)
    with pytest.raises(ValueError, match="retain_weight must be positive"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), retain=["dog"], retain_weight=0, **FAST)
    with pytest.raises(ValueError, match="retain_samples must be a positive int"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), retain=["dog"], retain_samples=0, **FAST)


def test_specific_forgetting_on_the_toy_model():
    """On a trained model the concept's attention falls more than an unrelated concept's."""
    toy = pytest.importorskip("fmn.toy")
    from pathlib import Path
    if not hasattr(toy, "default_model_path") or not (Path(toy.default_model_path()) / "model_index.json").is_file():
        pytest.skip("the toy model is not shipped in this checkout yet")
    from diffusers import DiffusionPipeline
    base = DiffusionPipeline.from_pretrained(str(toy.default_model_path()))
    pipe = copy.deepcopy(base)
    forget(pipe, "circle", inplace=True, steps=20, lr=1e-4, backend="reference", progress=False, gen_steps=4)
    c0, _ = held_out_score(base, ["a red circle", "a circle in blue"], "circle")
    c1, _ = held_out_score(pipe, ["a red circle", "a circle in blue"], "circle")
    s0, _ = held_out_score(base, ["a red square", "a square in blue"], "square")
    s1, _ = held_out_score(pipe, ["a red square", "a square in blue"], "square")
    assert c1 / c0 < 0.9 and c1 / c0 < s1 / s0


@pytest.mark.parametrize("train, expect", [
    ("attn2", lambda k: ".attn2." in k),
    ("attn2-kv", lambda k: ".attn2.to_k." in k or ".attn2.to_v." in k),
    ("unet", lambda k: True),
    ("lora", lambda k: ".attn2." in k and ".lora_" in k),
])
def test_every_trainable_set_runs_and_restores_the_pipeline(sd1, train, expect):
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    patch = forget(pipe, "cat", images=latents(), train=train, **FAST)
    assert_restored(pipe, before)
    keys = list(patch.tensors)
    assert keys and all(k.startswith("unet.") and expect(k[5:]) for k in keys)
    assert set(patch.fingerprint["tensors"]) == (
        {k.split(".lora_")[0] + ".weight" for k in keys} if train == "lora" else set(keys))
    if train == "unet":
        assert any(".resnets." in k for k in keys)  # beyond attention
    if train == "attn2-kv":
        assert not any(".to_q." in k or ".to_out." in k for k in keys)
    assert patch.summary["loss_after"] < patch.summary["loss_before"]


@pytest.mark.parametrize("loss", ["visual", "both"])
def test_visual_and_both_losses_run(sd1, loss):
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    patch = forget(pipe, "cat", loss=loss, n_images=2, **FAST)
    assert_restored(pipe, before)
    s = patch.summary
    assert s["n_reference"] == 2 and all(v == v for v in s["losses"]) and patch.tensors


def test_visual_targets_come_from_suppressed_generation(sd1, monkeypatch):
    """The x~0 targets are generated with the same seeds under fmn.attention.suppress."""
    calls = []
    real = F._generate

    def spy(pipe, prompts, seeds, resolution, opts, device, suppressed=None):
        out = real(pipe, prompts, seeds, resolution, opts, device, suppressed)
        calls.append((list(seeds), suppressed, out))
        return out

    monkeypatch.setattr(F, "_generate", spy)
    forget(copy.deepcopy(sd1), "cat", loss="visual", n_images=2, **FAST)
    assert [(s, z) for s, z, _ in calls] == [([0, 1], None), ([0, 1], ["cat"])]
    assert not torch.allclose(calls[0][2], calls[1][2])  # zeroing the concept changes the images


@pytest.mark.parametrize("kind, loss", [("sd2", "attention"), ("sdxl", "attention"), ("sdxl", "both")])
def test_same_code_path_runs_on_sd2_and_sdxl(kind, loss):
    pipe = tiny_sd_pipeline(kind)
    before = state(pipe)
    patch = forget(pipe, ["cat", "red dog"], loss=loss, **{**FAST, "n_images": 1, "steps": 3})
    assert_restored(pipe, before)
    assert patch.concepts == ["cat", "red dog"] and patch.summary["n_reference"] == 2
    assert patch.summary["loss_after"] < patch.summary["loss_before"]


def test_several_concepts_and_the_fused_kernel(sd1):
    """Two concepts in one run, through the fused Triton path (the interpreter on CPU)."""
    patch = forget(copy.deepcopy(sd1), ["cat", "dog"], images=latents(), **{**FAST, "steps": 1, "backend": "auto"})
    ref = forget(copy.deepcopy(sd1), ["cat", "dog"], images=latents(), **{**FAST, "steps": 1})
    assert patch.concepts == ["cat", "dog"]
    assert patch.summary["n_reference"] == 4  # the shared images, once per concept
    assert patch.summary["loss_before"] == pytest.approx(ref.summary["loss_before"], rel=1e-4)
    assert patch.summary["loss_after"] == pytest.approx(ref.summary["loss_after"], rel=1e-3)


def test_style_and_custom_templates(sd1, monkeypatch):
    seen = []
    real = F.encode_text
    monkeypatch.setattr(F, "encode_text", lambda pipe, prompts, parts=None: (seen.append(prompts), real(pipe, prompts, parts))[1])
    forget(copy.deepcopy(sd1), "van gogh", images=latents(), template="style", **FAST)
    forget(copy.deepcopy(sd1), "cat", images=latents(), template=["{} on a beach", "a {} sleeping"], **FAST)
    assert seen == [["a photo in the style of van gogh"], ["cat on a beach", "a cat sleeping"]]


def test_concept_inversion_uses_new_tokens_and_leaves_the_text_encoder_alone(sd1):
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    patch = forget(pipe, "cat", images=latents(), inversion=True, inversion_steps=3, inversion_tokens=2, **FAST)
    assert_restored(pipe, before)
    assert all(torch.equal(te[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert patch.summary["inverted_tokens"] == ["<fmn-c0-0> <fmn-c0-1>"]
    assert patch.options["inversion"] and patch.tensors


def test_bf16_and_gradient_checkpointing(sd1):
    plain = forget(copy.deepcopy(sd1), "cat", images=latents(), patch_dtype="exact", **FAST)
    ckpt = forget(copy.deepcopy(sd1), "cat", images=latents(), patch_dtype="exact", gradient_checkpointing=True, **FAST)
    for k in plain.tensors:
        torch.testing.assert_close(ckpt.tensors[k], plain.tensors[k], rtol=1e-5, atol=1e-7)
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    bf = forget(pipe, "cat", images=latents(), precision="bf16", **FAST)
    assert_restored(pipe, before)
    assert bf.summary["loss_after"] < bf.summary["loss_before"]
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), precision="fp16", **FAST)


def test_half_precision_pipeline_is_restored_exactly(sd1):
    pipe = copy.deepcopy(sd1).to(dtype=torch.bfloat16)
    before = state(pipe)
    with pytest.warns(UserWarning, match="bf16"):
        patch = forget(pipe, "cat", images=latents(), **FAST)
    assert_restored(pipe, before)
    assert patch.fingerprint["dtype"] == "bfloat16"
    patch.check(pipe)


def test_inplace_keeps_trained_weights(sd1):
    pipe = copy.deepcopy(sd1)
    patch = forget(pipe, "cat", images=latents(), inplace=True, patch_dtype="exact", **FAST)
    params = dict(pipe.unet.named_parameters())
    assert all(torch.equal(params[k[5:]], v) for k, v in patch.tensors.items())
    assert all(isinstance(m.processor, type(sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor))
               for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    assert not any(isinstance(m.processor, FusedCrossAttnProcessor)
                   for n, m in pipe.unet.named_modules() if hasattr(m, "processor"))


def test_images_from_a_folder(sd1, tmp_path):
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (24 + 4 * i, 20), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    patch = forget(copy.deepcopy(sd1), "cat", images=tmp_path, **FAST)
    assert patch.summary["n_reference"] == 3
    per = tmp_path / "per"
    for c in ("cat", "red_dog"):
        (per / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), "white").save(per / c / "a.jpg")
    patch = forget(copy.deepcopy(sd1), ["cat", "red dog"], images=per, **FAST)
    assert patch.summary["n_reference"] == 2


def test_bad_images_are_refused(sd1, tmp_path):
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        forget(pipe, "cat", images=tmp_path / "missing", **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        forget(pipe, "cat", images=empty, **FAST)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*a.png"):
        forget(pipe, "cat", images=broken, **FAST)
    assert_restored(pipe, before)


def test_concept_absent_from_the_template_is_refused(sd1):
    with pytest.raises(ValueError, match="'cat' does not occur in prompt 'a photo of cats'"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), template="a photo of {}s", **FAST)
    with pytest.raises(ValueError, match="exactly once"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), template="a photo", **FAST)
    with pytest.raises(ValueError, match="train must be"):
        forget(copy.deepcopy(sd1), "cat", images=latents(), train="everything", **FAST)
    with pytest.raises(ValueError, match="concepts"):
        forget(copy.deepcopy(sd1), [], images=latents(), **FAST)


def test_nan_loss_fails_cleanly(sd1):
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    bad = latents()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ForgetError, match="nan"):
        forget(pipe, "cat", images=bad, **{**FAST, "batch_size": 2})
    assert_restored(pipe, before)


@pytest.mark.parametrize("train", ["attn2", "lora"])
def test_interrupt_restores_the_pipeline(sd1, monkeypatch, train):
    pipe = copy.deepcopy(sd1)
    before = state(pipe)
    calls = {"n": 0}
    real = F._unet_call

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "_unet_call", interrupted)
    with pytest.raises(KeyboardInterrupt):
        forget(pipe, "cat", images=latents(), train=train, **{**FAST, "steps": 5})
    assert_restored(pipe, before)


def test_public_api_names(sd1):
    """fmn.forget is the function, also after the trainer module is imported."""
    import fmn
    import fmn.trainer  # noqa: F401
    for _ in range(2):
        patch = fmn.forget(copy.deepcopy(sd1), "cat", images=latents(), **{**FAST, "steps": 1})
        assert isinstance(patch, fmn.Patch)
    assert fmn.load_patch is not None and callable(fmn.apply)
