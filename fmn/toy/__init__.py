"""fmn's built-in toy text-to-image model, its data set, classifier and forgetting evaluation.

A Stable-Diffusion-structured pipeline (AutoencoderKL, CLIPTextModel + the SD 1.x CLIP tokenizer,
UNet2DConditionModel with cross-attention, DDIM) trained from scratch on procedural 32 px images of
five shapes in five colours; small enough to ship inside the package and to run on a CPU.

    from fmn.toy import load_default_pipeline, load_classifier, evaluate
    pipe = load_default_pipeline()
    metrics = evaluate(pipe, forgotten="circle")
"""
from __future__ import annotations

from importlib import resources

from fmn.toy.data import COLORS, SHAPES  # noqa: F401
from fmn.toy.evaluate import (DEFAULT_GUIDANCE, DEFAULT_STEPS, SPLITS, PromptSpec, evaluate,  # noqa: F401
                              evaluate_split, generate, prompt_set, relative_to, save_grid, score, slot_control)

__all__ = ["SHAPES", "COLORS", "default_model_path", "load_default_pipeline", "load_classifier", "evaluate",
           "evaluate_split", "SPLITS", "generate", "score", "prompt_set", "PromptSpec", "save_grid", "relative_to",
           "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "slot_control"]


def default_model_path() -> str:
    """Folder of the shipped toy pipeline; `StableDiffusionPipeline.from_pretrained(path)` loads it offline."""
    return str(resources.files("fmn") / "assets" / "toy" / "pipeline")


def load_default_pipeline(device="cpu", dtype=None, path: str | None = None):
    """The shipped toy StableDiffusionPipeline in fp32 (weights are stored in fp16), progress bars off."""
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():  # newer diffusers call it `dtype`; older ones know only `torch_dtype`
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(path or default_model_path(),
                                                       torch_dtype=dtype or torch.float32, local_files_only=True,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_classifier(path: str | None = None, device="cpu"):
    """The shipped shape-and-colour classifier (see fmn.toy.classifier)."""
    from fmn.toy.classifier import load_classifier as _load

    return _load(path, device)
