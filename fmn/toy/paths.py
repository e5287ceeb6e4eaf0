"""Where the shipped toy pipelines live (fmn/assets/toy), and whether a pipeline was loaded from there.

Its own module, importing nothing else of fmn, so that fmn.families can ask it without an import cycle
(fmn.toy's package imports fmn.toy.evaluate, which imports fmn.families)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

# built-in model name -> folder under fmn/assets/toy
MODELS = {"toy": "pipeline", "toy-mmdit": "mmdit"}
# "toy-mmdit" has no T5: StableDiffusion3Pipeline appends max_sequence_length zero tokens (default 256) in its
# place. The model was trained for any count in 1..256; with 1 it draws ~4x faster at the same accuracy
# (tuning split, base: shape and colour 1.00 with 1 and with 256; 14.5 s vs 61 s for 50 images, 1 thread),
# so fmn trains, draws and evaluates it with 1 (fmn.families.mmdit, fmn.toy.evaluate, fmn generate).
TOY_MMDIT_TEXT_LENGTH = 1


def model_path(name: str = "toy") -> str:
    """Folder of a shipped toy pipeline ("toy" or "toy-mmdit"), loadable offline with from_pretrained
    ("toy-mmdit" needs text_encoder_3=None, tokenizer_3=None: it has no T5)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return str(resources.files("fmn") / "assets" / "toy" / MODELS[name])


def default_model_path() -> str:
    """Folder of the shipped "toy" (UNet) pipeline; `StableDiffusionPipeline.from_pretrained(path)` loads it offline."""
    return model_path("toy")


def is_built_in(pipe, name: str = "toy") -> bool:
    """Whether `pipe` was loaded from the shipped toy pipeline `name`'s folder: its name_or_path (which
    diffusers' from_pretrained records) resolves to model_path(name). A copy saved elsewhere, or a
    pipeline built in memory, is not."""
    loaded_from = getattr(pipe, "name_or_path", None)
    if not loaded_from:
        return False
    return Path(loaded_from).expanduser().resolve() == Path(model_path(name)).resolve()
