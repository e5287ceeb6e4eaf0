"""Patch files: the small safetensors file a forgetting run produces, and applying it.

A patch holds only what the run changed, under diffusers state-dict names with the component
prefix ("unet."):

- kind "delta":   trained - base for every trained tensor (fp16 by default; bf16 or fp32 on request;
                  or int8 with one fp32 scale per output row under "<name>.delta_scale", half
                  the size of fp16: the rounding, <= 1/254 of the row's largest change, is far
                  below an fp16 weight's own rounding)
- kind "replace": the trained tensors themselves, exactly, in their training dtype
- kind "lora":    LoRA A/B matrices in the peft/diffusers key format
                  ("unet.<module>.lora_A.weight", "unet.<module>.lora_B.weight", alpha folded into B
                  so that alpha == rank), which `pipe.load_lora_weights(path)` accepts as is.

String metadata (JSON values): "fmn.format", "fmn.version", "fmn.kind", "fmn.concepts",
"fmn.options", "fmn.base_model", "fmn.fingerprint", "fmn.summary"; plus "format": "pt".

The fingerprint names, shapes and 16 evenly spaced sample values of every base tensor the patch
touches (for LoRA: the wrapped modules' base weights), in the dtype they had. `apply` compares
them with the target pipeline within the rounding of the coarser of the two dtypes, so a patch
made on an fp32 load applies to an fp16/bf16 load of the same model, but a patch for another
model, a patch applied twice to an fp32 model, or a model of another shape is refused.
Patches are read with safetensors only (never pickle) and written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fmn.patches.patch_check import (DOWN_SUFFIX, KINDS, N_SAMPLES, SCALE_SUFFIX, UP_SUFFIX, PatchError,  # noqa: F401
                             PatchMismatchError, check_metadata, check_shapes, check_tensors, checksum,
                             fingerprint_hash, target_names)

FORMAT = "fmn.patch/1"
METADATA_KEYS = {"format", "fmn.format", "fmn.version", "fmn.kind", "fmn.concepts", "fmn.options", "fmn.base_model",
                 "fmn.fingerprint", "fmn.summary", "fmn.checksum"}


# ----------------------------------------------------------------------------- tensor lookup
def _component(pipe, name: str):
    prefix, _, rest = name.partition(".")
    comp = getattr(pipe, prefix, None) if prefix else None
    if comp is None or not isinstance(comp, torch.nn.Module):
        # a bare module (a UNet) may be passed instead of a pipeline
        if isinstance(pipe, torch.nn.Module) and prefix == "unet":
            return pipe, rest
        raise PatchMismatchError(f"the pipeline has no component {prefix!r} (needed for {name!r})")
    return comp, rest


def get_tensor(pipe, name: str) -> torch.Tensor:
    """The parameter `name` ("unet.down_blocks...weight") of `pipe`; peft-wrapped layers are looked
    through (".base_layer.")."""
    module, rest = _component(pipe, name)
    mod_name, _, attr = rest.rpartition(".")
    for cand in (mod_name, mod_name + ".base_layer"):
        try:
            sub = module.get_submodule(cand) if cand else module
        except AttributeError:
            continue
        t = getattr(sub, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    raise PatchMismatchError(f"the pipeline has no tensor {name!r}")


def _sample_index(numel: int) -> torch.Tensor:
    return torch.linspace(0, numel - 1, min(N_SAMPLES, numel)).round().long()


def fingerprint(pipe, names) -> dict:
    """{"hash", "dtype", "tensors": {name: {"shape", "values"}}} over the given base tensors."""
    tensors, dtypes = {}, set()
    for name in sorted(names):
        t = get_tensor(pipe, name).detach()
        vals = t.reshape(-1)[_sample_index(t.numel()).to(t.device)].float().cpu()
        tensors[name] = {"shape": list(t.shape), "values": vals.tolist()}
        dtypes.add(str(t.dtype).replace("torch.", ""))
    return _with_hash({"dtype": ",".join(sorted(dtypes)), "tensors": tensors})


def restrict_fingerprint(fp: dict, names) -> dict:
    """The fingerprint of a subset of its tensors."""
    names = set(names)
    return _with_hash({"dtype": fp["dtype"], "tensors": {k: v for k, v in fp["tensors"].items() if k in names}})


def _with_hash(fp: dict) -> dict:
    return {"hash": fingerprint_hash(fp["tensors"]), **fp}


def _eps(dtype_name: str) -> float:
    worst = 0.0
    for d in dtype_name.split(","):
        dt = getattr(torch, d, torch.float32)
        worst = max(worst, torch.finfo(dt).eps if dt.is_floating_point else 0.0)
    return worst


def check_fingerprint(pipe, fp: dict, *, base_model: str = "?") -> None:
    """Raises PatchMismatchError unless `pipe` holds the fingerprinted base tensors."""
    for name, rec in fp["tensors"].items():
        try:
            t = get_tensor(pipe, name).detach()
        except PatchMismatchError as e:
            raise PatchMismatchError(f"patch made for base model {base_model!r} does not fit this pipeline: {e}") from None
        if list(t.shape) != rec["shape"]:
            raise PatchMismatchError(
                f"patch made for base model {base_model!r} does not fit this pipeline: {name} has shape "
                f"{list(t.shape)}, the patch expects {rec['shape']}")
        got = t.reshape(-1)[_sample_index(t.numel()).to(t.device)].float().cpu()
        want = torch.tensor(rec["values"], dtype=torch.float32)
        rtol = max(_eps(fp.get("dtype", "float32")), torch.finfo(t.dtype).eps)
        atol = 2.0 ** -24 if (t.dtype == torch.float16 or "float16" in fp.get("dtype", "").split(",")) else 0.0
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            i = int(((got - want).abs() - rtol * want.abs()).argmax())
            raise PatchMismatchError(
                f"patch made for base model {base_model!r} (fingerprint {fp.get('hash')}) does not match this "
                f"pipeline's weights: {name} sample {i} is {got[i].item():.6g}, expected {want[i].item():.6g}. "
                f"It was made for other weights, or is already applied.")


# ----------------------------------------------------------------------------- files
def atomic_write(path, write, *, force=False, suffix=None):
    """Calls write(tmp_path) on a temporary file next to `path`, then os.replace()s it into place.
    Refuses an existing `path` unless force; leaves nothing behind on failure or interrupt."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def quantize_delta(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 per-row scales (rows = first dim) with delta ~= codes * scales."""
    rows = delta.float().reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
    scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(rows / scale).clamp(-127, 127).to(torch.int8)
    return codes.reshape(delta.shape), scale.flatten()


def dequantize_delta(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = codes.float().reshape(scale.numel(), -1) * scale.float()[:, None]
    return rows.reshape(codes.shape)


@dataclass
class Patch:
    """What a forgetting run changed. `tensors` are on the CPU, named "<component>.<param name>"."""
    tensors: dict
    kind: str
    concepts: list
    base_model: str
    fingerprint: dict
    options: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    version: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PatchError(f"unknown patch kind {self.kind!r}; expected one of {KINDS}")
        if not self.version:
            from fmn import __version__
            self.version = __version__

    # -- info
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def id(self) -> str:
        h = hashlib.sha256()
        h.update(self.fingerprint.get("hash", "").encode())
        h.update(json.dumps([self.kind, self.concepts, self.options], sort_keys=True, default=str).encode())
        return h.hexdigest()[:12]

    def __repr__(self):
        return (f"Patch(kind={self.kind!r}, concepts={self.concepts!r}, tensors={len(self.tensors)}, "
                f"{self.nbytes / 2**20:.2f} MiB, base={self.base_model!r}, fingerprint={self.fingerprint.get('hash')})")

    def metadata(self) -> dict:
        meta = {
            "format": "pt",
            "fmn.format": FORMAT,
            "fmn.version": self.version,
            "fmn.kind": self.kind,
            "fmn.concepts": json.dumps(self.concepts),
            "fmn.options": json.dumps(self.options, sort_keys=True, default=str),
            "fmn.base_model": self.base_model,
            "fmn.fingerprint": json.dumps(self.fingerprint),
            "fmn.summary": json.dumps(self.summary, sort_keys=True, default=str),
        }
        meta["fmn.checksum"] = checksum(self._cpu_tensors(), meta)
        return meta

    def _cpu_tensors(self) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}

    # -- checks
    def validate(self, pipe=None) -> None:
        """Raises PatchError unless the metadata has its schema and every tensor is an allowed, finite,
        complete change of the fingerprinted shape; with `pipe`, also unless every target tensor exists
        there with that shape. Touches no weight."""
        check_metadata(self.kind, self.concepts, self.fingerprint, self.options, self.summary, self.base_model)
        check_tensors(self.kind, self.tensors, self.fingerprint, self.options)
        if pipe is not None:
            check_shapes(lambda name: get_tensor(pipe, name), self.kind, self.tensors)

    # -- files
    def save(self, path, *, force: bool = False) -> Path:
        """Writes the patch atomically; refuses an existing file unless force. Returns the path."""
        from safetensors.torch import save_file
        tensors = self._cpu_tensors()
        for k, v in tensors.items():
            if v.dtype.is_floating_point and not torch.isfinite(v).all():
                raise PatchError(f"patch tensor {k} is not finite (overflow in {v.dtype}?); "
                                 "nothing was written. Try patch_dtype='fp32' or 'exact'.")
        self.validate()
        meta = self.metadata()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), force=force)

    @classmethod
    def load(cls, path) -> "Patch":
        """Reads and validates a patch file (safetensors only); PatchError if it is not a usable patch."""
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
        meta, tensors = _read_safetensors(path)
        if meta.get("fmn.format") != FORMAT:
            raise PatchError(f"{path} is not an fmn patch (metadata fmn.format = {meta.get('fmn.format')!r}, "
                             f"expected {FORMAT!r})")
        unknown = sorted(set(meta) - METADATA_KEYS)
        if unknown:  # e.g. a damaged key name, which would otherwise hide the checksum
            raise PatchError(f"{path}: unknown metadata {unknown}: the file was changed or damaged after it was written")
        if "fmn.checksum" in meta and meta["fmn.checksum"] != checksum(tensors, meta):
            raise PatchError(f"{path}: checksum mismatch: the file was changed or damaged after it was written")
        try:
            fields = dict(kind=meta["fmn.kind"], concepts=json.loads(meta["fmn.concepts"]),
                          base_model=meta.get("fmn.base_model", ""), fingerprint=json.loads(meta["fmn.fingerprint"]),
                          options=json.loads(meta.get("fmn.options", "{}")),
                          summary=json.loads(meta.get("fmn.summary", "{}")), version=meta.get("fmn.version", ""))
        except KeyError as e:
            raise PatchError(f"{path}: broken fmn metadata: missing {e}") from None
        except json.JSONDecodeError as e:
            raise PatchError(f"{path}: broken fmn metadata: not JSON ({e})") from None
        check_metadata(fields["kind"], fields["concepts"], fields["fingerprint"], fields["options"],
                       fields["summary"], fields["base_model"])
        patch = cls(tensors=tensors, **fields)
        try:
            patch.validate()
        except PatchError as e:
            raise PatchError(f"{path}: {e}") from None
        return patch

    # -- applying
    def check(self, pipe) -> None:
        """Raises PatchMismatchError unless the patch was made for `pipe`'s current weights."""
        check_fingerprint(pipe, self.fingerprint, base_model=self.base_model)

    def changes(self) -> dict:
        """{target name: (kind of change, fp32 tensor)}: "add" a delta, "set" a replacement."""
        t, out = self.tensors, {}
        for name in target_names(self.kind, t):
            if self.kind == "lora":
                stem = name[: -len(".weight")]
                a, b = t[stem + ".lora_A.weight"].float(), t[stem + ".lora_B.weight"].float()
                out[name] = ("add", b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
            elif name + UP_SUFFIX in t:
                down = t[name + DOWN_SUFFIX].float()
                out[name] = ("add", t[name + UP_SUFFIX].float() @ down.reshape(down.shape[0], -1))
            elif t[name].dtype == torch.int8:
                out[name] = ("add", dequantize_delta(t[name], t[name + SCALE_SUFFIX]))
            else:
                out[name] = ("add" if self.kind == "delta" else "set", t[name])
        return out

    def apply(self, pipe, *, check: bool = True, fuse: bool = True, adapter_name: str | None = None):
        """Applies the patch to `pipe` in place and returns it; all or nothing: any failure (a bad
        patch, another model, an interrupt) leaves every weight of `pipe` as it was.

        Everything is validated (and with check=True the fingerprint compared) before any weight is
        touched. delta/replace patches change the trained tensors; LoRA patches are merged into the
        base weights when fuse=True (W += B @ A, in fp32, then cast back); with fuse=False they are
        loaded as a peft adapter through `pipe.load_lora_weights` (name `adapter_name`, default
        "fmn_<patch id>"), which keeps them switchable.
        """
        self.validate(pipe)
        if check:
            self.check(pipe)
        if self.kind == "lora" and not fuse:
            return self._load_adapter(pipe, adapter_name or f"fmn_{self.id}")
        with torch.no_grad():
            new = {}
            for name, (op, t) in self.changes().items():
                w = get_tensor(pipe, name)
                t = t.to(w.device).reshape(w.shape)
                value = (w.float() + t.float()).to(w.dtype) if op == "add" else t.to(w.dtype)
                if not bool(torch.isfinite(value).all()):
                    raise PatchError(f"applying the patch would make {name} non-finite (overflow in {w.dtype}?); "
                                     "the pipeline is unchanged")
                new[name] = (w, value)
            _copy_all(new)
        return pipe

    def _load_adapter(self, pipe, name):
        try:
            pipe.load_lora_weights({k: v for k, v in self.tensors.items()}, adapter_name=name)
        except BaseException:
            if name in getattr(pipe, "get_list_adapters", lambda: {})().get("unet", []):
                pipe.delete_adapters([name])
            raise
        return pipe

    @classmethod
    def from_trained(cls, trained: dict, base: dict | None, *, component: str = "unet",
                     dtype: torch.dtype | None = torch.float16, lora_scale: float | None = None,
                     fingerprint: dict, **fields) -> "Patch":
        """The patch of a finished run: only what changed.

        trained: {name: trained tensor} of the component's parameters (names without the prefix),
        or with lora_scale given, peft's adapter state dict ("...lora_A.weight", "...lora_B.weight"):
        alpha is folded into B (the patch loads with alpha == rank) and pairs whose B is still zero
        are left out. base: {name: base tensor} (None for LoRA); unchanged tensors are left out.
        dtype: of the stored deltas (None: kind "replace", the trained tensors themselves; int8:
        quantized deltas with per-row scales). fingerprint: of the base tensors the run could touch,
        restricted here to those it did. fields: concepts, base_model, options, summary. A run that
        changed nothing gives a patch without tensors.
        """
        prefix, tensors = component + ".", {}
        if lora_scale is not None:
            for k, a in trained.items():
                if ".lora_A." not in k:
                    continue
                b = trained[k.replace(".lora_A.", ".lora_B.")] * lora_scale
                if not b.any():
                    continue  # B still zero: this layer got no gradient, the pair changes nothing
                for key, t in ((k, a), (k.replace(".lora_A.", ".lora_B."), b)):
                    tensors[prefix + key] = t if dtype is None else t.to(dtype)
            touched = {k.split(".lora_")[0] + ".weight" for k in tensors}
            kind = "lora"
        else:
            for n, t in trained.items():
                if torch.equal(t, base[n].float()):
                    continue  # unchanged (no gradient reached it): not part of the patch
                if dtype is None:
                    tensors[prefix + n] = t
                elif dtype == torch.int8:
                    tensors[prefix + n], tensors[prefix + n + SCALE_SUFFIX] = quantize_delta(t - base[n].float())
                else:
                    tensors[prefix + n] = (t - base[n].float()).to(dtype)
            touched = {k for k in tensors if not k.endswith(SCALE_SUFFIX)}
            kind = "replace" if dtype is None else "delta"
        return cls(tensors=tensors, kind=kind, fingerprint=restrict_fingerprint(fingerprint, touched), **fields)


def _copy_all(new: dict) -> None:
    """w.copy_(value) for every (w, value); on any failure or interrupt, the old values come back."""
    done = []
    try:
        for w, value in new.values():
            old = w.detach().clone()
            w.copy_(value)
            done.append((w, old))
    except BaseException:
        for w, old in reversed(done):
            w.copy_(old)
        raise


def _read_safetensors(path: Path):
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise PatchError(f"cannot read patch {path}: not a safetensors file ({e})") from None
    return meta, tensors


def load_patch(path) -> Patch:
    """Reads a patch file (safetensors only)."""
    return Patch.load(path)


def apply(pipe, patch, *, check: bool = True, fuse: bool = True):
    """Applies `patch` (a Patch or a path) to `pipe` in place, after checking its fingerprint."""
    if not isinstance(patch, Patch):
        patch = load_patch(patch)
    return patch.apply(pipe, check=check, fuse=fuse)
