"""Patch validation: every corrupted variant of a valid patch file (truncated, flipped bytes, edited
metadata, extra or missing tensors, wrong shapes, NaN, wrong dtype) is refused with a PatchError and
leaves the model unchanged; apply is all-or-nothing even when it fails half-way."""
import copy
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fmn.patches.patch import Patch, PatchError, apply, load_patch
from fmn.patches.patch_check import checksum, fingerprint_hash
from fmn.testing import tiny_sd_pipeline
from fmn.forgetting.trainer import forget

FAST = dict(steps=2, lr=1e-3, backend="reference", progress=False)
TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def base():
    return tiny_sd_pipeline("sd1")


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    """(patch, path of its file) for an fp16 delta patch and an int8 one."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in ("fp16", "int8"):
        patch = forget(copy.deepcopy(base), "cat", images=latents, patch_dtype=dtype, **FAST)
        out[dtype] = (patch, patch.save(tmp_path_factory.mktemp(dtype) / "p.safetensors"))
    return out


def snapshot(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder", "vae")
            for n, p in getattr(pipe, c).named_parameters()}


@pytest.fixture(scope="module")
def target(base):
    """A pipeline that refused patches are applied to, with its weights before any of them."""
    pipe = copy.deepcopy(base)
    return pipe, snapshot(pipe)


def assert_refused(target, path_or_patch):
    """PatchError from loading or applying, and no weight of the pipeline changed."""
    pipe, before = target
    with pytest.raises(PatchError) as info:
        apply(pipe, path_or_patch)
    after = snapshot(pipe)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"refused patch changed {changed[:3]}"
    assert "\n" not in str(info.value) and str(info.value)
    return str(info.value)


def rewrite(path, dst, tensors=None, meta_edit=None, fresh_checksum=True):
    """Writes a copy of the patch file with its tensors / metadata edited."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}
    tensors = old if tensors is None else tensors(old)
    if meta_edit:
        meta_edit(meta)
    if fresh_checksum:
        meta["fmn.checksum"] = checksum(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_valid_patches_apply(base, good):
    for _, path in good.values():
        assert load_patch(path).kind == "delta"
        apply(copy.deepcopy(base), path)


def test_truncated_files_are_refused(base, target, good, tmp_path):
    data = good["fp16"][1].read_bytes()
    for n in (0, 4, 8, 20, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        bad = tmp_path / f"t{n}.safetensors"
        bad.write_bytes(data[:n])
        assert_refused(target, bad)


def test_flipped_bytes_are_refused(base, target, good, tmp_path):
    for dtype in ("fp16", "int8"):
        data = good[dtype][1].read_bytes()
        header = int.from_bytes(data[:8], "little") + 8
        rng = random.Random(0)
        # the length field, the JSON header, and the tensor data
        positions = [0, 3, 7] + rng.sample(range(8, header), 12) + rng.sample(range(header, len(data)), 16)
        for pos in positions:
            flipped = bytearray(data)
            flipped[pos] ^= 1 << rng.randrange(8)
            bad = tmp_path / f"f{pos}.safetensors"
            bad.write_bytes(bytes(flipped))
            assert_refused(target, bad)


def _edit_fp(change):
    def edit(meta):
        fp = json.loads(meta["fmn.fingerprint"])
        meta["fmn.fingerprint"] = json.dumps(change(fp))
    return edit


def _rehash(fp):
    fp["hash"] = fingerprint_hash(fp["tensors"])
    return fp


METADATA_EDITS = {
    "fingerprint {}": lambda m: m.update({"fmn.fingerprint": "{}"}),
    "fingerprint []": lambda m: m.update({"fmn.fingerprint": "[]"}),
    "fingerprint not JSON": lambda m: m.update({"fmn.fingerprint": "{oops"}),
    "fingerprint no tensors": _edit_fp(lambda fp: _rehash({**fp, "tensors": {}})),
    "fingerprint tensors a list": _edit_fp(lambda fp: {**fp, "tensors": []}),
    "fingerprint value changed, hash kept": _edit_fp(
        lambda fp: {**fp, "tensors": {k: {**v, "values": [x + 1 for x in v["values"]]}
                                      for k, v in fp["tensors"].items()}}),
    "fingerprint shape edited": _edit_fp(
        lambda fp: _rehash({**fp, "tensors": {k: {**v, "shape": [7, 3]} for k, v in fp["tensors"].items()}})),
    "fingerprint dtype unknown": _edit_fp(lambda fp: {**fp, "dtype": "float128"}),
    "fingerprint record missing values": _edit_fp(
        lambda fp: {**fp, "tensors": {k: {"shape": v["shape"]} for k, v in fp["tensors"].items()}}),
    "kind unknown": lambda m: m.update({"fmn.kind": "weird"}),
    "kind lora on deltas": lambda m: m.update({"fmn.kind": "lora"}),
    "kind missing": lambda m: m.pop("fmn.kind"),
    "concepts empty": lambda m: m.update({"fmn.concepts": "[]"}),
    "concepts a string": lambda m: m.update({"fmn.concepts": '"cat"'}),
    "options a list": lambda m: m.update({"fmn.options": "[]"}),
    "train set unknown": lambda m: m.update({"fmn.options": json.dumps({"train": "vae"})}),
    "summary not JSON": lambda m: m.update({"fmn.summary": "{"}),
    "format other": lambda m: m.update({"fmn.format": "fmn.patch/9"}),
}


@pytest.mark.parametrize("edit", list(METADATA_EDITS))
def test_edited_metadata_is_refused(base, target, good, tmp_path, edit):
    # with the checksum recomputed (a crafted file) the schema check refuses it ...
    msg = assert_refused(target, rewrite(good["fp16"][1], tmp_path / "a.safetensors", meta_edit=METADATA_EDITS[edit]))
    assert "Traceback" not in msg
    # ... and with the old checksum (a damaged file) the checksum does
    assert_refused(target, rewrite(good["fp16"][1], tmp_path / "b.safetensors", meta_edit=METADATA_EDITS[edit],
                                 fresh_checksum=False))


def _with_fp_entry(name, shape):
    """Adds a fingerprint record for `name` (so that only the name rule can refuse it)."""
    def edit(meta):
        fp = json.loads(meta["fmn.fingerprint"])
        n = 1
        for s in shape:
            n *= s
        fp["tensors"][name] = {"shape": list(shape), "values": [0.0] * min(16, n)}
        meta["fmn.fingerprint"] = json.dumps(_rehash(fp))
    return edit


def _scale_of(name):
    return name + ".delta_scale"


TENSOR_EDITS = {
    # name outside the allowed set (fingerprinted, so only the name rule refuses it)
    "text encoder tensor": ("fp16", "text_encoder.text_model.final_layer_norm.weight", torch.zeros(32), True),
    "vae tensor": ("fp16", "vae.decoder.conv_in.bias", torch.zeros(64), True),
    "unet tensor outside attn2": ("fp16", "unet.conv_in.bias", torch.zeros(32), True),
    # not fingerprinted
    "extra attn2 tensor": ("fp16", "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight",
                           torch.zeros(64, 64), False),
    "stray scale": ("fp16", _scale_of(TO_K), torch.ones(32), False),
}


@pytest.mark.parametrize("edit", list(TENSOR_EDITS))
def test_extra_tensors_are_refused(base, target, good, tmp_path, edit):
    dtype, name, value, fingerprinted = TENSOR_EDITS[edit]
    path = rewrite(good[dtype][1], tmp_path / "p.safetensors", tensors=lambda t: {**t, name: value.half()
                                                                                  if "scale" not in name else value},
                   meta_edit=_with_fp_entry(name, value.shape) if fingerprinted else None)
    assert_refused(target, path)


VALUE_EDITS = {
    "missing tensor": lambda t: {k: v for k, v in t.items() if k != TO_K},
    "shape [1]": lambda t: {**t, TO_K: torch.zeros(1, dtype=torch.float16)},
    "shape [7, 3]": lambda t: {**t, TO_K: torch.zeros(7, 3, dtype=torch.float16)},
    "half the columns": lambda t: {**t, TO_K: t[TO_K][:, ::2].contiguous()},
    "NaN": lambda t: {**t, TO_K: t[TO_K].clone().index_fill_(0, torch.tensor([1]), float("nan"))},
    "inf": lambda t: {**t, TO_K: t[TO_K].clone().index_fill_(0, torch.tensor([0]), float("inf"))},
    "float64": lambda t: {**t, TO_K: t[TO_K].double()},
    "int32": lambda t: {**t, TO_K: t[TO_K].int()},
    "int8 without scale": lambda t: {**t, TO_K: t[TO_K].to(torch.int8)},
    "bool": lambda t: {**t, TO_K: t[TO_K] != 0},
}
INT8_EDITS = {
    "scale missing": lambda t: {k: v for k, v in t.items() if k != _scale_of(TO_K)},
    "scale wrong length": lambda t: {**t, _scale_of(TO_K): torch.ones(3)},
    "scale NaN": lambda t: {**t, _scale_of(TO_K): torch.full_like(t[_scale_of(TO_K)], float("nan"))},
    "scale fp16": lambda t: {**t, _scale_of(TO_K): t[_scale_of(TO_K)].half()},
    "codes float": lambda t: {**t, TO_K: t[TO_K].half()},
}


@pytest.mark.parametrize("edit", list(VALUE_EDITS))
def test_wrong_values_are_refused(base, target, good, tmp_path, edit):
    assert_refused(target, rewrite(good["fp16"][1], tmp_path / "p.safetensors", tensors=VALUE_EDITS[edit]))


@pytest.mark.parametrize("edit", list(INT8_EDITS))
def test_wrong_int8_groups_are_refused(base, target, good, tmp_path, edit):
    assert_refused(target, rewrite(good["int8"][1], tmp_path / "p.safetensors", tensors=INT8_EDITS[edit]))


def test_patch_objects_are_validated_before_apply(base, target, good):
    patch = good["fp16"][0]
    crafted = Patch(tensors={**patch.tensors, TO_K: torch.zeros(1, dtype=torch.float16)}, kind="delta",
                    concepts=["cat"], base_model="", fingerprint=patch.fingerprint, options=patch.options)
    assert "does not fit" in assert_refused(target, crafted)
    no_fp = Patch(tensors=dict(patch.tensors), kind="delta", concepts=["cat"], base_model="",
                  fingerprint={"hash": fingerprint_hash({}), "dtype": "float32", "tensors": {}}, options=patch.options)
    assert "no tensors" in assert_refused(target, no_fp)
    # fingerprint off (check=False) still validates names and shapes
    pipe = copy.deepcopy(base)
    with pytest.raises(PatchError):
        crafted.apply(pipe, check=False)


def test_overflow_while_applying_changes_nothing(base, good):
    patch = good["fp16"][0]
    huge = {k: torch.full_like(v, 1e5, dtype=torch.float32) for k, v in patch.tensors.items()}  # > fp16 max
    half = copy.deepcopy(base).to(dtype=torch.float16)
    before = snapshot(half)
    with pytest.raises(PatchError, match="non-finite"):
        Patch(tensors=huge, kind="delta", concepts=["cat"], base_model="", fingerprint=patch.fingerprint,
              options=patch.options).apply(half)
    assert all(torch.equal(before[k], v) for k, v in snapshot(half).items())


def test_failure_half_way_restores_every_weight(base, good, monkeypatch):
    patch = good["fp16"][0]
    pipe = copy.deepcopy(base)
    before = snapshot(pipe)
    calls = {"n": 0}
    real_copy = torch.Tensor.copy_

    def copy_then_interrupt(self, src, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_copy(self, src, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        patch.apply(pipe)
    monkeypatch.undo()
    assert calls["n"] >= 3
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items()), "half-applied patch left behind"
    patch.apply(pipe)  # and it still applies afterwards


def test_damaged_metadata_key_is_refused(base, target, good, tmp_path):
    # one flipped bit in the key "fmn.checksum" must not switch the checksum off
    data = good["fp16"][1].read_bytes()
    pos = data.index(b"fmn.checksum") + len("fmn.checksu")
    flipped = bytearray(data)
    flipped[pos] ^= 1
    bad = tmp_path / "key.safetensors"
    bad.write_bytes(bytes(flipped))
    assert "unknown metadata" in assert_refused(target, bad)
