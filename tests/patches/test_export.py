"""Low-rank patches and LoRA export: fmn.compress keeps the best rank-r approximation and its file
round-trips; a patch exported as a diffusers LoRA and loaded with `pipe.load_lora_weights(FILE)`
reproduces fmn.apply (exactly for a LoRA-trained patch, within the compression error for deltas);
the kohya/A1111/ComfyUI key convention (bias changes as ComfyUI's ".diff_b") loads through diffusers'
own kohya converter, which refuses diff_b keys: their pairs load there, with bias=False the file too.
On tiny SD 1.x, 2.x and XL pipelines."""
import copy

import pytest
import torch
from safetensors import safe_open

from fmn.patches.compress import compress, factorize
from fmn.patches.lora_export import export, kohya_name
from fmn.patches.patch import Patch, load_patch, restrict_fingerprint
from fmn.testing import tiny_sd_pipeline
from fmn.forgetting.trainer import forget

FAST = dict(steps=1, backend="reference", progress=False)


def unet_out(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if pipe.unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and time ids
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([50, 700]), encoder_hidden_states=e, **kw).sample


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family(request):
    """(kind, base pipeline, LoRA-trained patch, fp32 delta patch)."""
    base = tiny_sd_pipeline(request.param)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lora = forget(copy.deepcopy(base), "cat", images=latents, train="lora", lora_rank=2, lr=1e-2, **FAST)
    delta = forget(copy.deepcopy(base), "cat", images=latents, lr=1e-3, patch_dtype="fp32", **FAST)
    return request.param, base, lora, delta


def loaded(base, path):
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(path))
    return pipe


def assert_reproduces(got, want, base_out, tol):
    effect = (want - base_out).abs().max().item()
    assert effect > 1e-4, "the patch changes nothing: the comparison would prove nothing"
    err = (got - want).abs().max().item()
    assert err <= tol, f"max difference {err:.3g} (patch effect {effect:.3g})"


def test_lora_patch_exports_exactly(family, tmp_path):
    kind, base, lora, _ = family
    want, b = unet_out(lora.apply(copy.deepcopy(base))), unet_out(base)
    for fmt in ("diffusers", "kohya"):
        path = tmp_path / f"{fmt}.safetensors"
        info = export(lora, path, fmt)
        assert info["rank_max"] == 2 and not info["dropped"]
        # the exported pairs are the patch's own fp16 tensors: only the fused vs unfused fp32 sums differ
        assert_reproduces(unet_out(loaded(base, path)), want, b, tol=1e-5)


def test_delta_patch_exports_within_compression_error(family, tmp_path):
    kind, base, _, delta = family
    want, b = unet_out(delta.apply(copy.deepcopy(base))), unet_out(base)
    path = tmp_path / "d.safetensors"
    info = export(delta, path, "diffusers", rel_error=0.0, dtype=torch.float32)  # lossless: full rank
    assert info["max_rel_error"] < 1e-5 and not info["dropped"]
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".attn2.to_out.0.lora_B.bias") for k in keys)  # the bias change travels too
    assert_reproduces(unet_out(loaded(base, path)), want, b, tol=1e-5)
    # at rank 1 the file is exactly the rank-1 compressed patch
    export(delta, tmp_path / "r1.safetensors", "diffusers", rank=1, dtype=torch.float32)
    small = compress(delta, rank=1, dtype=torch.float32)
    assert_reproduces(unet_out(loaded(base, tmp_path / "r1.safetensors")),
                      unet_out(small.apply(copy.deepcopy(base))), b, tol=1e-5)


def kohya_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kohya_keys_and_diffusers_kohya_loader(family, tmp_path):
    kind, base, _, delta = family
    path = tmp_path / "k.safetensors"
    info = export(delta, path, "kohya", rel_error=0.0, dtype=torch.float32)
    sd, meta = kohya_file(path)
    assert all(k.startswith("lora_unet_") and k.rsplit(".", 2)[0].count(".") == 0 for k in sd)
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha", "diff_b"}
    some = next(iter(delta.fingerprint["tensors"]))[len("unet."):].rsplit(".", 1)[0]
    assert kohya_name(some) in {k.split(".")[0] for k in sd}
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and all(a.numel() == 1 for a in alphas)
    # each bias change: the whole difference as "<module's kohya key>.diff_b", beside the module's pair
    biases = {n[len("unet."):-len(".bias")]: change for n, (_, change) in delta.changes().items()
              if n.endswith(".bias")}
    assert biases and not info["dropped"]
    for module, change in biases.items():
        key = kohya_name(module)
        assert key + ".lora_up.weight" in sd
        torch.testing.assert_close(sd[key + ".diff_b"], change.reshape(-1).float(), rtol=0, atol=0)
    # diffusers' kohya converter refuses diff_b keys: the pairs load through it, and the biases added as
    # ComfyUI adds diff_b ("<module>.bias" += diff_b) give fmn.apply's result
    pipe = copy.deepcopy(base)
    with torch.no_grad():
        for module in biases:
            pipe.unet.get_submodule(module).bias += sd[kohya_name(module) + ".diff_b"]
    pipe.load_lora_weights({k: v for k, v in sd.items() if not k.endswith(".diff_b")})
    want = unet_out(delta.apply(copy.deepcopy(base)))
    assert_reproduces(unet_out(pipe), want, unet_out(base), tol=1e-5)
    # bias=False: no diff_b, the biases named as dropped; the file loads in diffusers as it is and
    # equals the patch without them
    path = tmp_path / "k-no-bias.safetensors"
    info = export(delta, path, "kohya", rel_error=0.0, dtype=torch.float32, bias=False)
    sd, meta = kohya_file(path)
    assert not any(k.endswith(".diff_b") for k in sd)
    assert sorted(info["dropped"]) == sorted(f"unet.{m}.bias" for m in biases) and "fmn.dropped" in meta
    kept = {k: v for k, v in delta.tensors.items() if k not in info["dropped"]}
    no_bias = Patch(tensors=kept, kind="delta", concepts=delta.concepts, base_model="",
                    fingerprint=restrict_fingerprint(delta.fingerprint, kept), options=delta.options)
    assert_reproduces(unet_out(loaded(base, path)), unet_out(no_bias.apply(copy.deepcopy(base))), unet_out(base),
                      tol=1e-5)


def test_replace_patch_is_refused_clearly(tmp_path):
    rep = Patch(tensors={"unet.a.attn2.to_q.weight": torch.zeros(2, 2)}, kind="replace", concepts=["x"],
                base_model="", fingerprint={"hash": "", "dtype": "float32", "tensors": {}})
    with pytest.raises(ValueError, match="replace"):
        export(rep, tmp_path / "x.safetensors", "diffusers")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- compression
def test_factorize_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 24, generator=g) @ torch.diag(torch.logspace(0, -3, 24)) @ torch.randn(24, 24, generator=g)
    s = torch.linalg.svdvals(d.double())
    for r in (1, 3, 10):
        up, down, err = factorize(d, rank=r)
        assert up.shape == (40, r) and down.shape == (r, 24)
        want = float(s[r:].norm() / s.norm())  # Eckart-Young: the error of the best rank-r matrix
        assert err == pytest.approx(want, rel=1e-3, abs=1e-6)
    for bound in (0.3, 0.05, 1e-3):
        up, down, err = factorize(d, rel_error=bound)
        r = up.shape[1]
        assert err <= bound * (1 + 1e-4)
        assert r == 1 or float(s[r - 1:].norm() / s.norm()) > bound  # one rank less would not do
    with pytest.raises(ValueError):
        factorize(d, rank=0)
    with pytest.raises(ValueError):
        factorize(d)


def test_compressed_patch_round_trip(family, tmp_path):
    kind, base, _, delta = family
    small = compress(delta, rank=2)
    assert small.nbytes < delta.nbytes / 2
    assert any(k.endswith(".delta_up") for k in small.tensors)
    back = load_patch(small.save(tmp_path / "s.safetensors"))
    assert back.summary["compression"]["rank"] == 2
    pipe = back.apply(copy.deepcopy(base))
    b = dict(base.unet.named_parameters())
    for name, (op, change) in back.changes().items():
        w = pipe.unet.get_parameter(name[len("unet."):])
        assert op == "add"
        torch.testing.assert_close(w, b[name[len("unet."):]] + change.reshape(w.shape), rtol=0, atol=1e-6)
    # the change at rank 2 is within the reported error of the full change
    full = delta.changes()
    for name, rec in back.summary["compression"]["per_tensor"].items():
        d, approx = full[name][1].reshape(-1), back.changes()[name][1].reshape(-1).float()
        assert (d - approx).norm() <= (rec["rel_error"] + 2e-3) * d.norm() + 1e-7, name
