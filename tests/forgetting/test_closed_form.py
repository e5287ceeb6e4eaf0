"""The closed-form anchor edit (fmn.forgetting.closed_form) and its use by fmn.forget (closed_form=True)."""
import copy

import pytest
import torch

import fmn
from fmn.forgetting import closed_form
from fmn.families import family_for
from fmn.forgetting.options import ForgetOptions
from fmn.patches.patch import Patch
from fmn.patches.patch_check import PatchError, check_tensors


def _objective(w_new, w, c, a, k, lam):
    rho = closed_form.RIDGE * float((c.T @ c + lam * k.T @ k).diagonal().mean())
    return (((c @ w_new.T - a @ w.T) ** 2).sum() + lam * ((k @ w_new.T - k @ w.T) ** 2).sum()
            + rho * ((w_new - w) ** 2).sum())


def test_solve_is_the_least_squares_minimum():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    c, a = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(20, 8, generator=g, dtype=torch.float64)
    best = closed_form.solve(w, c, a, k, 0.7)
    f0 = _objective(best, w, c, a, k, 0.7)
    for _ in range(5):  # any nudge costs more: the normal equations hold
        nudged = best + 1e-3 * torch.randn(best.shape, generator=g, dtype=torch.float64)
        assert _objective(nudged, w, c, a, k, 0.7) > f0
    grad = torch.autograd.functional.jacobian(lambda x: _objective(x, w, c, a, k, 0.7), best)
    assert grad.abs().max() < 1e-8 * max(1.0, float(f0))


def test_solve_maps_the_concept_and_keeps_the_rest_when_they_are_independent():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    c, a = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(10, 16, generator=g, dtype=torch.float64)  # 3 + 10 <= 16: both can hold exactly
    new = closed_form.solve(w, c, a, k, 1.0)
    scale = float((a @ w.T).abs().max())
    assert torch.allclose(c @ new.T, a @ w.T, atol=1e-3 * scale)
    assert torch.allclose(k @ new.T, k @ w.T, atol=1e-3 * scale)
    off = torch.linalg.qr(torch.cat([c, k]).T, mode="complete").Q[:, 13:].T  # directions no row uses
    assert torch.allclose(off @ new.T, off @ w.T, atol=1e-9 * scale)


def test_solve_keeps_dtype_and_refuses_bad_shapes():
    w = torch.randn(4, 3, dtype=torch.float16)
    assert closed_form.solve(w, torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 3), 1.0).dtype == torch.float16
    with pytest.raises(ValueError, match="anchor"):
        closed_form.solve(w, torch.randn(2, 3), torch.randn(3, 3), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        closed_form.solve(w, torch.randn(2, 4), torch.randn(2, 4), torch.randn(5, 4), 1.0)


def test_solve_holds_the_kept_rows_to_keep_weight():
    g = torch.Generator().manual_seed(2)
    w, w0 = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    c, a = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(10, 16, generator=g, dtype=torch.float64)
    new = closed_form.solve(w, c, a, k, 1.0, keep_weight=w0)
    scale = float((k @ w0.T).abs().max())
    assert torch.allclose(k @ new.T, k @ w0.T, atol=1e-3 * scale)  # the base's outputs, not w's
    assert not torch.allclose(k @ new.T, k @ w.T, atol=1e-1 * scale)
    assert torch.allclose(c @ new.T, a @ w.T, atol=1e-3 * scale)  # the anchor's under the weight as it is
    with pytest.raises(ValueError, match="keep_weight"):
        closed_form.solve(w, c, a, k, 1.0, keep_weight=w0[:, :8])


def _recovery(edited, base, c):
    """min over h of the adversarial objective: how close some embedding brings c's base outputs back."""
    h = closed_form.adversarial_rows(edited, base, c)
    gram = sum(w.T @ w for w in edited)
    mu = closed_form.ADVERSARIAL_RIDGE * float(gram.diagonal().mean())
    return sum(((h @ w.T - c @ b.T) ** 2).sum() for w, b in zip(edited, base)) + mu * (h ** 2).sum(), h, mu


def test_adversarial_rows_minimise_the_recovery_objective():
    g = torch.Generator().manual_seed(3)
    edited = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    base = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    c = torch.randn(3, 8, generator=g, dtype=torch.float64)
    f0, h, mu = _recovery(edited, base, c)
    f = lambda x: sum(((x @ w.T - c @ b.T) ** 2).sum() for w, b in zip(edited, base)) + mu * (x ** 2).sum()
    assert torch.autograd.functional.jacobian(f, h).abs().max() < 1e-8 * float(f0)
    for _ in range(5):
        assert f(h + 1e-3 * torch.randn(h.shape, generator=g, dtype=torch.float64)) > f0


def _layers(n):
    return [(f"l{i}.weight", "embeds", torch.nn.Linear(16, 12, bias=False).double()) for i in range(n)]


def test_edit_rounds_make_the_concept_harder_to_recover_and_keep_the_base_rows():
    """Each adversarial round adds the embedding that best recovers the concept's base outputs; with more rounds
    the best recovery is worse (the objective's minimum grows), while the kept rows stay at the base's outputs
    (16 inputs: room for every row)."""
    from fmn.families.base import Prompts
    g = torch.Generator().manual_seed(4)
    c, a, k = (torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (2, 2, 3))
    texts = [Prompts(x[None], None, [0]) for x in (c, a, k)]
    recovered = []
    for rounds in (0, 1, 3):
        layers = _layers(2)
        for _, _, layer in layers:
            layer.weight.data = torch.randn(12, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        base = {name: layer.weight.detach() + 0.1 for name, _, layer in layers}  # the weights before training
        closed_form.edit(layers, [texts[0]], [texts[1]], [texts[2]], 1.0, base=base, rounds=rounds)
        edited = [layer.weight.detach() for _, _, layer in layers]
        recovered.append(float(_recovery(edited, list(base.values()), c)[0]))
        for (name, _, layer) in layers:
            assert torch.allclose(layer(k), k @ base[name].T, atol=5e-2 * float((k @ base[name].T).abs().max()))
    assert recovered[0] < recovered[1] < recovered[2]


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "closed_form"),
    (dict(closed_form=True, closed_form_rounds=-1), "closed_form_rounds"),
    (dict(closed_form=True, closed_form_rounds=1.5), "closed_form_rounds"),
    (dict(closed_form=True, preserve_base="yes"), "preserve_base"),
    (dict(closed_form=True, train="lora"), "lora"),
    (dict(closed_form=True, preserve_weight=0.0), "preserve_weight"),
    (dict(closed_form="yes"), "closed_form must be"),
])
def test_options_refuse(bad, match):
    with pytest.raises(ValueError, match=match):
        ForgetOptions(**bad)


def _values(family, layer, prompts):
    with torch.no_grad():
        return layer(family.encode_prompts(prompts)[0])


def test_forget_closed_form_on_the_toy_unet(toy_base, tmp_path):
    pipe = copy.deepcopy(toy_base)
    family = family_for(pipe)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    patch = fmn.forget(pipe, "heart", closed_form=True, steps=0, anchor="circle", retain=["square", "star"],
                       template=["a red {}", "a {}"], progress=False)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # inplace=False: untouched
    assert patch.tensors and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in patch.tensors)
    assert patch.summary["closed_form_layers"] == 14 and patch.summary["n_reference"] == 0
    path = tmp_path / "heart.safetensors"
    patch.save(path)
    Patch.load(path).apply(pipe)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    base_layer = copy.deepcopy(layer)
    base_layer.weight.data = before["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].clone()
    heart, circle = _values(family, layer, ["a red heart"]), _values(family, base_layer, ["a red circle"])
    base_heart = _values(family, base_layer, ["a red heart"])
    # the concept's prompt now gives (nearly) the anchor's keys: far closer than before the edit
    assert (heart - circle).norm() < 0.1 * (base_heart - circle).norm()
    kept, base_kept = _values(family, layer, ["a red square"]), _values(family, base_layer, ["a red square"])
    assert (kept - base_kept).norm() < 0.1 * (base_heart - circle).norm()


def test_forget_closed_form_on_the_toy_mmdit_edits_the_context_embedder():
    from fmn.toy import load_pipeline
    pipe = load_pipeline("toy-mmdit")
    patch = fmn.forget(pipe, "red", closed_form=True, steps=0, anchor="green", retain=["blue"],
                       template=["a {} circle"], progress=False)
    assert sorted(patch.tensors) == ["transformer.context_embedder.weight"]
    patch.validate()


def test_closed_form_then_training_steps(toy_base):
    pipe = copy.deepcopy(toy_base)
    patch = fmn.forget(pipe, "heart", closed_form=True, steps=2, lr=1e-4, anchor="circle", retain=["square"],
                       template=["a {}"], n_images=1, gen_steps=1, backend="reference", progress=False)
    assert any(".attn2.to_q." in n for n in patch.tensors)  # trained
    assert "loss_after" in patch.summary and "seconds_closed_form" in patch.summary


def test_preserve_base_puts_the_kept_prompts_back_after_training(toy_base):
    """Training moves every prompt's keys; preserve_base (with an adversarial round) brings the kept ones back towards
    the base model's, where the plain edit keeps the trained ones."""
    family = family_for(toy_base)
    key = lambda p: p.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k  # noqa: E731
    base = _values(family, key(toy_base), ["a square", "a"])
    moved = {}
    for preserve in (False, True):
        pipe = copy.deepcopy(toy_base)
        patch = fmn.forget(pipe, "heart", closed_form=True, steps=2, lr=1e-2, anchor="circle", retain=["square"],
                           template=["a {}"], n_images=1, gen_steps=1, backend="reference", progress=False,
                           inplace=True, seed=0, preserve_base=preserve, closed_form_rounds=int(preserve))
        assert patch.options["preserve_base"] is preserve and patch.options["closed_form_rounds"] == int(preserve)
        moved[preserve] = float((_values(family_for(pipe), key(pipe), ["a square", "a"]) - base).norm())
    assert moved[True] < 0.5 * moved[False]  # not all the way: more kept rows (every slot) than dimensions


def test_patch_check_allows_the_edited_layers_only_with_closed_form():
    from fmn.patches.patch import fingerprint  # noqa: F401  (the record format below is fingerprint's)
    name = "transformer.context_embedder.weight"
    tensors = {name: torch.zeros(2, 2, dtype=torch.float16)}
    fp = {"hash": "x", "dtype": "float16", "tensors": {name: {"shape": [2, 2], "values": [0.0] * 4}}}
    with pytest.raises(PatchError, match="outside the trainable set"):
        check_tensors("delta", tensors, fp, {"train": "attn2"})
    check_tensors("delta", tensors, fp, {"train": "attn2", "closed_form": True})
    bias = {"transformer.context_embedder.bias": torch.zeros(2, dtype=torch.float16)}
    fp_bias = {"hash": "x", "dtype": "float16",
               "tensors": {"transformer.context_embedder.bias": {"shape": [2], "values": [0.0] * 2}}}
    with pytest.raises(PatchError, match="closed-form edit"):  # the edit changes weights, never biases
        check_tensors("delta", bias, fp_bias, {"train": "attn2", "closed_form": True})


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "sd3", "flux"])
def test_closed_form_on_every_family_moves_the_concept_to_the_anchor(kind):
    """Tiny SD 1.x / SDXL UNets (attn2 to_k / to_v) and SD3 / FLUX transformers (context_embedder, and the
    pooled text projection): the edited layers bring the concept's prompt towards the anchor's outputs. Not
    all the way: these random encoders are contextual and narrow (every slot after the word differs between
    "cat" and "dog", and more rows than dimensions compete), so the least-squares compromise halves the
    distance or better, where the toy models' per-slot encoders let it close (the toy tests above)."""
    from fmn.testing import tiny_mmdit_pipeline, tiny_sd_pipeline
    pipe = tiny_mmdit_pipeline(kind) if kind in ("sd3", "flux") else tiny_sd_pipeline(kind)
    family = family_for(pipe)
    layers = family.closed_form_layers()
    assert layers and {k for _, k, _ in layers} == ({"embeds", "pooled"} if kind in ("sd3", "flux") else {"embeds"})
    patch = fmn.forget(pipe, "cat", closed_form=True, steps=0, anchor="dog", retain=["car"],
                       template=["a photo of {}", "{}"], progress=False)
    patch.validate()
    name, kind_in, layer = layers[0]
    assert f"{family.component}.{name}" in patch.tensors
    base_layer = copy.deepcopy(layer)
    fmn.apply(pipe, patch)
    with torch.no_grad():
        embeds, pooled = family.encode_prompts(["a photo of cat", "a photo of dog"])
        x = embeds if kind_in == "embeds" else pooled
        after, before = layer(x[0]), base_layer(x[0])
        anchor = base_layer(x[1])
    assert (after - anchor).norm() < 0.5 * (before - anchor).norm()
