"""Patch files: round trips (apply reproduces the trained weights), fingerprints, LoRA files that
diffusers loads, atomic writes, unreadable files."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fmn
from fmn.forgetting.trainer import forget
from fmn.patches.patch import Patch, PatchError, PatchMismatchError, apply, check_fingerprint, fingerprint, load_patch
from fmn.testing import tiny_sd_pipeline

FAST = dict(steps=3, lr=1e-3, backend="reference", progress=False)




def latents(n=2, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base():
    return tiny_sd_pipeline("sd1")


def trained(base, **kw):
    """(pipe holding the trained weights, patch)."""
    pipe = copy.deepcopy(base)
    patch = forget(pipe, "cat", images=latents(), inplace=True, **{**FAST, **kw})
    return pipe, patch


def unet_params(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}


def unet_out(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([50, 700]), encoder_hidden_states=e).sample


def test_delta_round_trip_within_fp16_rounding(base, tmp_path):
    pipe, patch = trained(base)
    assert patch.kind == "delta" and all(t.dtype == torch.float16 for t in patch.tensors.values())
    path = patch.save(tmp_path / "p.safetensors")
    target = apply(copy.deepcopy(base), path)
    want, got, b = unet_params(pipe), unet_params(target), unet_params(base)
    changed = 0
    for name in want:
        if "unet." + name not in patch.tensors:
            assert torch.equal(got[name], b[name]), f"{name} is not in the patch but changed"
            continue
        d = want[name] - b[name]
        changed += int((d != 0).sum())
        # fp16 rounding of the delta: 2^-11 relative (normal range), 2^-25 absolute (subnormals);
        # then one fp32 rounding each for the delta and for w + delta.
        bound = 2.0 ** -11 * d.abs() + 2.0 ** -25 + 2.0 ** -23 * (want[name].abs() + d.abs())
        err = (got[name] - want[name]).abs()
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"
        assert not torch.equal(got[name], b[name])
    assert changed > 0


def test_int8_delta_round_trip_within_half_a_step(base, tmp_path):
    pipe, patch = trained(base, patch_dtype="int8")
    fp16_size = trained(base)[1].nbytes
    assert patch.kind == "delta" and patch.nbytes < 0.6 * fp16_size
    target = apply(copy.deepcopy(base), patch.save(tmp_path / "p.safetensors"))
    want, got, b = unet_params(pipe), unet_params(target), unet_params(base)
    for name in want:
        if "unet." + name not in patch.tensors:
            assert torch.equal(got[name], b[name]), f"{name} is not in the patch but changed"
            continue
        assert patch.tensors["unet." + name].dtype == torch.int8
        d = want[name] - b[name]
        rows = d.reshape(d.shape[0] if d.dim() > 1 else 1, -1)
        # half an int8 step of the row's scale (max |delta| / 127), plus fp32 rounding of w + delta
        half_step = (rows.abs().amax(1, keepdim=True) / 254).expand_as(rows).reshape(d.shape)
        bound = half_step * (1 + 1e-5) + 2.0 ** -23 * (want[name].abs() + d.abs())
        err = (got[name] - want[name]).abs()
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


def test_exact_patch_reproduces_trained_weights_bitwise(base, tmp_path):
    pipe, patch = trained(base, patch_dtype="exact")
    assert patch.kind == "replace"
    target = apply(copy.deepcopy(base), load_patch(patch.save(tmp_path / "p.safetensors")))
    want, got = unet_params(pipe), unet_params(target)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_lora_patch_round_trip_and_diffusers_loads_it(base, tmp_path):
    pipe, patch = trained(base, train="lora", lr=1e-2, lora_rank=2, lora_alpha=4)
    assert patch.kind == "lora"
    keys = list(patch.tensors)
    assert keys and all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert any(".attn2.to_q." in k for k in keys) and any(".attn2.to_out.0." in k for k in keys)
    path = patch.save(tmp_path / "forget_cat.safetensors")
    # fmn.apply (fused, W += B @ A) against the trained pipeline (merged in fp32)
    fused = apply(copy.deepcopy(base), path)
    want, got = unet_params(pipe), unet_params(fused)
    for stem in {k[len("unet."):-len(".lora_A.weight")] for k in keys if ".lora_A." in k}:
        a = patch.tensors[f"unet.{stem}.lora_A.weight"].float()
        b = patch.tensors[f"unet.{stem}.lora_B.weight"].float()
        # A and B rounded to fp16: 2^-11 relative each, so |B||A| * 2^-10, plus fp32 roundings.
        bound = 2.0 ** -10 * (b.abs() @ a.abs()) + 2.0 ** -22 * want[stem + ".weight"].abs() + 1e-9
        err = (got[stem + ".weight"] - want[stem + ".weight"]).abs()
        assert (err <= bound).all(), stem
        assert not torch.equal(got[stem + ".weight"], unet_params(base)[stem + ".weight"])
    # diffusers' own loader takes the file as is (peft keys, alpha folded into B)
    loaded = copy.deepcopy(base)
    loaded.load_lora_weights(str(path))
    assert getattr(loaded.unet, "peft_config", None)
    torch.testing.assert_close(unet_out(loaded), unet_out(fused), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unet_out(loaded), unet_out(base), atol=1e-4)
    # and fmn can load it as an adapter too (fuse=False)
    adapter = apply(copy.deepcopy(base), patch, fuse=False)
    torch.testing.assert_close(unet_out(adapter), unet_out(fused), rtol=1e-4, atol=1e-5)


def test_metadata_round_trip(base, tmp_path):
    _, patch = trained(base, base_model="tiny/sd1")
    path = patch.save(tmp_path / "p.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["fmn.format"] == "fmn.patch/1" and meta["fmn.kind"] == "delta"
    assert json.loads(meta["fmn.concepts"]) == ["cat"]
    assert meta["fmn.version"] == fmn.__version__ and meta["fmn.base_model"] == "tiny/sd1"
    opts = json.loads(meta["fmn.options"])
    assert opts["steps"] == 3 and opts["train"] == "attn2" and opts["lr"] == 1e-3
    fp = json.loads(meta["fmn.fingerprint"])
    assert set(fp["tensors"]) == set(patch.tensors) and fp["dtype"] == "float32"
    summary = json.loads(meta["fmn.summary"])
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    back = load_patch(path)
    assert back.concepts == ["cat"] and back.fingerprint == patch.fingerprint and back.options == patch.options
    assert all(torch.equal(back.tensors[k], patch.tensors[k]) for k in patch.tensors)


def test_fingerprint_refuses_other_model_and_double_apply(base, tmp_path):
    _, patch = trained(base)
    other = tiny_sd_pipeline("sd1", seed=1)
    before = unet_params(other)
    with pytest.raises(PatchMismatchError, match="does not match"):
        apply(other, patch)
    assert all(torch.equal(before[k], v) for k, v in unet_params(other).items()), "refused patch changed weights"
    with pytest.raises(PatchMismatchError):  # another architecture: missing tensors / shapes
        apply(tiny_sd_pipeline("sd2"), patch)
    target = apply(copy.deepcopy(base), patch)
    with pytest.raises(PatchMismatchError, match="already applied"):
        apply(target, patch)


def test_fingerprint_accepts_half_precision_loads_of_the_same_model(base):
    _, patch = trained(base)
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(base).to(dtype=dtype)
        patch.check(half)
        apply(half, patch)
        assert half.unet.dtype == dtype


def test_fingerprint_is_deterministic_and_sensitive(base):
    names = ["unet." + n for n, _ in base.unet.named_parameters() if ".attn2.to_k." in n]
    fp1, fp2 = fingerprint(base, names), fingerprint(copy.deepcopy(base), names)
    assert fp1 == fp2 and len(fp1["hash"]) == 16
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.unet.get_parameter(names[0][5:]).mul_(1.001)
    assert fingerprint(changed, names)["hash"] != fp1["hash"]
    with pytest.raises(PatchMismatchError):
        check_fingerprint(changed, fp1)


def test_save_refuses_existing_file_and_is_atomic(base, tmp_path, monkeypatch):
    _, patch = trained(base)
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        patch.save(path)
    assert path.read_bytes() == b"keep me"
    patch.save(path, force=True)
    assert load_patch(path).concepts == ["cat"]

    # a failure half-way through writing leaves neither a partial file nor a temp file
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        patch.save(tmp_path / "q.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


def test_unreadable_and_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(PatchError, match="cannot read"):
        load_patch(junk)
    foreign = tmp_path / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(PatchError, match="not an fmn patch"):
        load_patch(foreign)
    with pytest.raises(PatchError, match="does not exist"):
        load_patch(tmp_path / "missing.safetensors")
    with pytest.raises(PatchError):
        Patch(tensors={}, kind="weird", concepts=[], base_model="", fingerprint={})


def test_nonfinite_patch_is_not_written(tmp_path):
    p = Patch(tensors={"unet.w": torch.tensor([float("inf")], dtype=torch.float16)}, kind="delta",
              concepts=["x"], base_model="", fingerprint={"hash": "", "tensors": {}})
    with pytest.raises(PatchError, match="not finite"):
        p.save(tmp_path / "p.safetensors")
    assert not os.listdir(tmp_path)


def test_from_trained_keeps_only_what_changed_in_every_kind(base):
    names = ["w.a", "w.b"]
    saved = {n: torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    trained = {"w.a": saved["w.a"] + 0.25, "w.b": saved["w.b"].clone()}  # w.b unchanged
    fp = {"hash": "x", "dtype": "float32", "tensors": {f"unet.{n}": {"shape": [4, 3], "values": []} for n in names}}
    fields = dict(concepts=["cat"], base_model="m", options={}, summary={})
    delta = Patch.from_trained(trained, saved, dtype=torch.float16, fingerprint=fp, **fields)
    assert delta.kind == "delta" and list(delta.tensors) == ["unet.w.a"]
    assert torch.equal(delta.tensors["unet.w.a"], torch.full((4, 3), 0.25, dtype=torch.float16))
    assert list(delta.fingerprint["tensors"]) == ["unet.w.a"]  # restricted to what it touches
    exact = Patch.from_trained(trained, saved, dtype=None, fingerprint=fp, **fields)
    assert exact.kind == "replace" and torch.equal(exact.tensors["unet.w.a"], trained["w.a"])
    int8 = Patch.from_trained(trained, saved, dtype=torch.int8, fingerprint=fp, **fields)
    assert set(int8.tensors) == {"unet.w.a", "unet.w.a.delta_scale"} and int8.tensors["unet.w.a"].dtype == torch.int8
    lora = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2),
            "n.lora_A.weight": torch.ones(2, 3), "n.lora_B.weight": torch.zeros(4, 2)}  # n got no gradient
    fp_l = {"hash": "x", "dtype": "float32",
            "tensors": {f"unet.{m}.weight": {"shape": [4, 3], "values": [0.0]} for m in "mn"}}
    lp = Patch.from_trained(lora, None, dtype=None, lora_scale=0.5, fingerprint=fp_l, **fields)
    assert lp.kind == "lora" and set(lp.tensors) == {"unet.m.lora_A.weight", "unet.m.lora_B.weight"}
    assert torch.equal(lp.tensors["unet.m.lora_B.weight"], torch.full((4, 2), 0.5))  # alpha folded into B
    assert list(lp.fingerprint["tensors"]) == ["unet.m.weight"]
    assert not Patch.from_trained({"w.b": saved["w.b"]}, saved, fingerprint=fp, **fields).tensors
