"""Where the shipped toy pipelines live (fmn/assets/toy), and whether a pipeline was loaded from there.

Its own module, importing nothing else of fmn, so that fmn.families can ask it without an import cycle
(fmn.toy's package imports fmn.toy.evaluate, which imports fmn.families)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

# built-in model name -> folder under fmn/assets/toy
MODELS = {"toy": "pipeline", "toy-mmdit": "mmdit"}


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
