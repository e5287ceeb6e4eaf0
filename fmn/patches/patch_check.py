"""Checks of a patch's contents before any weight is touched.

`check_metadata` checks the metadata's schema (kinds, concept list, fingerprint records, its hash);
`check_tensors` checks the tensors without a pipeline: names within what the patch's kind and
trainable set can change and within the fingerprint (which must cover exactly the changed tensors),
known dtypes, finite values, complete groups (int8 codes with their scale, factor pairs, LoRA
pairs of one rank); `check_shapes` compares them with the target tensors of a pipeline.
Every failure is a PatchError (a ValueError) naming the tensor or field and what was expected.
"""
from __future__ import annotations

import hashlib
import math

import torch

KINDS = ("delta", "replace", "lora")
SCALE_SUFFIX = ".delta_scale"   # int8 delta: fp32 scale per output row
UP_SUFFIX = ".delta_up"         # low-rank delta: change = up [out, r] @ down [r, in...]
DOWN_SUFFIX = ".delta_down"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
N_SAMPLES = 16
# component -> trainable set (options["train"]) -> which of its parameter names the set can change.
# The MM-DiT sets are fmn.families.mmdit's (it reads them from here); a patch naming another
# component, or a name outside its set, is refused.
MMDIT_LORA_TARGETS = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_q")
TRAIN_SETS = {
    "unet": {
        "attn2": lambda n: ".attn2." in n,
        "attn2-kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
        "unet": lambda n: True,
        "lora": lambda n: any(f".attn2.{m}.weight" in n for m in ("to_q", "to_k", "to_v", "to_out.0")),
    },
    "transformer": {
        "attn2": lambda n: ".attn." in n,
        "attn2-kv": lambda n: ".attn.add_k_proj." in n or ".attn.add_v_proj." in n,
        "unet": lambda n: True,
        "lora": lambda n: any(f".{m}.weight" in n for m in MMDIT_LORA_TARGETS),
    },
}
COMPONENTS = tuple(TRAIN_SETS)
# component -> the layers a closed-form edit (options["closed_form"], fmn.forgetting.closed_form) changes, by what they
# read: "embeds" the prompts' token embeddings, "pooled" the pooled text vector. The families read them here.
CLOSED_FORM_LAYERS = {
    "unet": {"embeds": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n},
    "transformer": {"embeds": lambda n: n.startswith("context_embedder."),
                    "pooled": lambda n: n.startswith("time_text_embed.text_embedder.linear_1.")},
}


def in_closed_form_edit(component, param) -> bool:
    """Whether a closed-form edit changes the component's parameter `param` (its weight only)."""
    return param.endswith(".weight") and any(keep(param) for keep in CLOSED_FORM_LAYERS[component].values())


class PatchError(ValueError):
    """A patch file that cannot be read or used."""


class PatchMismatchError(PatchError):
    """The patch was made for other base weights than the pipeline's."""


def fingerprint_hash(tensors: dict) -> str:
    """The short hash of fingerprint records {name: {"shape", "values"}}."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        rec = tensors[name]
        h.update(name.encode())
        h.update(repr(rec["shape"]).encode())
        h.update(torch.tensor(rec["values"], dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def checksum(tensors: dict, metadata: dict) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every other metadata entry."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k in metadata if k != "fmn.checksum"):
        h.update(f"{key}={metadata[key]}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- metadata
def _fail(msg):
    raise PatchError(msg)


def _check_record(name, rec):
    if not isinstance(name, str) or not name:
        _fail(f"fingerprint: tensor name {name!r} is not a non-empty string")
    if not isinstance(rec, dict) or set(rec) != {"shape", "values"}:
        _fail(f"fingerprint: the record of {name} must be {{'shape': [...], 'values': [...]}}, got {rec!r:.80}")
    shape, values = rec["shape"], rec["values"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        _fail(f"fingerprint: the shape of {name} must be a list of sizes >= 0, got {shape!r:.80}")
    numel = math.prod(shape)
    if not isinstance(values, list) or len(values) != min(N_SAMPLES, numel):
        _fail(f"fingerprint: {name} must have {min(N_SAMPLES, numel)} sample values, got {values!r:.80}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        _fail(f"fingerprint: the sample values of {name} must be finite numbers")


def check_fingerprint_schema(fp) -> None:
    if not isinstance(fp, dict) or not {"hash", "dtype", "tensors"} <= set(fp):
        _fail(f"fingerprint must be an object with 'hash', 'dtype' and 'tensors', got {fp!r:.80}")
    if not isinstance(fp["dtype"], str) or not all(d in DTYPE_NAMES for d in fp["dtype"].split(",")):
        _fail(f"fingerprint dtype must be a comma-separated list of {DTYPE_NAMES}, got {fp['dtype']!r:.80}")
    if not isinstance(fp["tensors"], dict) or not fp["tensors"]:
        _fail("fingerprint names no tensors: the patch could not be checked against a model")
    for name, rec in fp["tensors"].items():
        _check_record(name, rec)
    if fp["hash"] != fingerprint_hash(fp["tensors"]):
        _fail(f"fingerprint hash {fp['hash']!r:.40} does not match its records (edited metadata?)")


def check_metadata(kind, concepts, fp, options, summary, base_model) -> None:
    """Raises PatchError unless the metadata fields have the expected types and values."""
    if kind not in KINDS:
        _fail(f"unknown patch kind {kind!r}; expected one of {KINDS}")
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        _fail(f"concepts must be a non-empty list of non-empty strings, got {concepts!r:.80}")
    for field, value in (("options", options), ("summary", summary)):
        if not isinstance(value, dict):
            _fail(f"{field} must be an object, got {value!r:.80}")
    if not isinstance(base_model, str):
        _fail(f"base_model must be a string, got {base_model!r:.80}")
    train = options.get("train", "lora" if kind == "lora" else "attn2")
    if train not in TRAIN_SETS["unet"] or (kind == "lora") != (train == "lora"):
        _fail(f"options.train {train!r} does not fit a {kind!r} patch")
    check_fingerprint_schema(fp)


# ----------------------------------------------------------------------------- tensors
def target_names(kind, tensors) -> list[str]:
    """The base tensors the patch changes ("unet.<param>"), sorted."""
    if kind == "lora":
        return sorted({k[: -len(LORA_A)] + ".weight" for k in tensors if k.endswith(LORA_A)})
    out = set()
    for k in tensors:
        for suffix in (SCALE_SUFFIX, UP_SUFFIX, DOWN_SUFFIX):
            if k.endswith(suffix):
                k = k[: -len(suffix)]
                break
        out.add(k)
    return sorted(out)


def _group(kind, tensors, name):
    """{role: tensor} of the tensors that make up the change of `name`."""
    if kind == "lora":
        stem = name[: -len(".weight")]
        return {"A": tensors.get(stem + LORA_A), "B": tensors.get(stem + LORA_B)}
    return {"full": tensors.get(name), "scale": tensors.get(name + SCALE_SUFFIX),
            "up": tensors.get(name + UP_SUFFIX), "down": tensors.get(name + DOWN_SUFFIX)}


def _check_group(kind, name, g) -> None:
    have = {k for k, v in g.items() if v is not None}
    for role in have:
        t = g[role]
        want = (torch.int8,) if (role == "full" and t.dtype == torch.int8 and kind == "delta") else FLOAT_DTYPES
        if role == "scale":
            want = (torch.float32,)
        if t.dtype not in want:
            _fail(f"patch tensor {name} ({role}) has dtype {t.dtype}, expected one of {want}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            _fail(f"patch tensor {name} ({role}) holds NaN or infinite values")
    if kind == "lora":
        if have != {"A", "B"}:
            _fail(f"LoRA tensor {name} needs both lora_A and lora_B")
        a, b = g["A"], g["B"]
        if a.dim() < 2 or b.dim() < 2 or b.shape[1] != a.shape[0] or a.shape[0] < 1:
            _fail(f"LoRA tensor {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not a pair of one rank")
    elif have == {"full"}:
        if kind == "replace" and g["full"].dtype == torch.int8:
            _fail(f"replace tensor {name} is int8; replacements hold weights in a float dtype")
        if g["full"].dtype == torch.int8:
            _fail(f"int8 delta {name} has no scale {name + SCALE_SUFFIX}")
    elif have == {"full", "scale"}:
        if g["full"].dtype != torch.int8:
            _fail(f"{name + SCALE_SUFFIX} belongs to an int8 delta, but {name} is {g['full'].dtype}")
        if g["scale"].dim() != 1:
            _fail(f"{name + SCALE_SUFFIX} must be 1-D, got shape {list(g['scale'].shape)}")
    elif have == {"up", "down"} and kind == "delta":
        up, down = g["up"], g["down"]
        if up.dim() != 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            _fail(f"low-rank delta {name}: up {list(up.shape)} and down {list(down.shape)} are not a pair of one rank")
    else:
        _fail(f"patch tensors for {name} are an incomplete or mixed set: {sorted(have)}")


def check_tensors(kind, tensors, fp, options) -> None:
    """Raises PatchError unless every tensor is a known, finite, complete change of an allowed name."""
    if not tensors:
        _fail("the patch holds no tensors")
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"patch entry {k} is not a tensor")
    names = target_names(kind, tensors)
    train = options.get("train", "lora" if kind == "lora" else "attn2")
    for name in names:
        component, _, param = name.partition(".")
        if component not in COMPONENTS or not param:
            _fail(f"patch tensor {name} is outside what fmn changes (components {COMPONENTS})")
        edited = options.get("closed_form") is True and in_closed_form_edit(component, param)
        if not (TRAIN_SETS[component][train](param) or edited):
            _fail(f"patch tensor {name} is outside the trainable set train={train!r}"
                  + (" and the closed-form edit" if options.get("closed_form") is True else ""))
        _check_group(kind, name, _group(kind, tensors, name))
    expected = {k for name in names for k in _keys(kind, name)}
    extra = sorted(set(tensors) - expected)
    if extra:
        _fail(f"patch tensors {extra[:3]} do not belong to any changed tensor")
    if set(names) != set(fp["tensors"]):
        missing = sorted(set(fp["tensors"]) - set(names))[:3]
        unknown = sorted(set(names) - set(fp["tensors"]))[:3]
        _fail(f"the fingerprint must cover exactly the changed tensors: not fingerprinted {unknown}, "
              f"fingerprinted but absent {missing}")
    for name in names:
        _check_against_record(kind, name, _group(kind, tensors, name), fp["tensors"][name]["shape"])


def _keys(kind, name):
    if kind == "lora":
        stem = name[: -len(".weight")]
        return (stem + LORA_A, stem + LORA_B)
    return (name, name + SCALE_SUFFIX, name + UP_SUFFIX, name + DOWN_SUFFIX)


def _check_against_record(kind, name, g, shape, error=PatchError) -> None:
    """The change of `name` must have the fingerprinted shape of its target."""
    rows = shape[0] if len(shape) > 1 else 1
    numel = math.prod(shape)
    if kind == "lora":
        a, b = g["A"], g["B"]
        ok = len(shape) >= 2 and b.shape[0] == shape[0] and a[0].numel() == numel // max(shape[0], 1)
        got = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}"
    elif g["up"] is not None:
        up, down = g["up"], g["down"]
        ok = len(shape) >= 2 and up.shape[0] == shape[0] and list(down.shape[1:]) == shape[1:]
        got = f"up {list(up.shape)}, down {list(down.shape)}"
    else:
        ok = list(g["full"].shape) == shape and (g["scale"] is None or g["scale"].numel() == rows)
        got = f"{list(g['full'].shape)}" + ("" if g["scale"] is None else f", scale {list(g['scale'].shape)}")
    if not ok:
        raise error(f"patch tensor {name} does not fit its target of shape {shape}: got {got}")


def check_shapes(lookup, kind, tensors) -> None:
    """Each changed tensor exists in the pipeline (lookup(name) -> tensor) with the fingerprinted shape."""
    for name in target_names(kind, tensors):
        target = lookup(name)
        _check_against_record(kind, name, _group(kind, tensors, name), list(target.shape), PatchMismatchError)
