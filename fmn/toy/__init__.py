"""fmn's built-in toy text-to-image models, their data set, classifier and forgetting evaluation.

Two pipelines trained from scratch on procedural 32 px images of five shapes in five colours, small
enough to ship inside the package and to run on a CPU:
  "toy"        Stable-Diffusion-structured (AutoencoderKL, CLIPTextModel + the SD 1.x CLIP tokenizer,
               UNet2DConditionModel with cross-attention, DDIM); scripts/train_toy_model.py.
  "toy-mmdit"  Stable-Diffusion-3-structured (SD3Transformer2DModel with joint attention, two
               CLIPTextModelWithProjection, no T5, flow matching, the "toy" VAE);
               scripts/train_toy_mmdit.py, fmn/toy/mmdit_model.py.

    from fmn.toy import load_pipeline, load_classifier, evaluate
    pipe = load_pipeline("toy")          # or "toy-mmdit"
    metrics = evaluate(pipe, forgotten="circle")
"""
from __future__ import annotations

from fmn.toy.data import COLORS, SHAPES  # noqa: F401
from fmn.toy.evaluate import (DEFAULT_GUIDANCE, DEFAULT_STEPS, SPLITS, PromptSpec, evaluate,  # noqa: F401
                              evaluate_split, generate, prompt_set, relative_to, save_grid, score, slot_control)
from fmn.toy.paths import MODELS, default_model_path, model_path  # noqa: F401

__all__ = ["SHAPES", "COLORS", "MODELS", "model_path", "load_pipeline", "default_model_path",
           "load_default_pipeline", "load_classifier", "evaluate", "evaluate_split", "SPLITS",
           "generate", "score", "prompt_set", "PromptSpec", "save_grid", "relative_to",
           "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "slot_control"]


def load_pipeline(name: str = "toy", device="cpu", dtype=None, path: str | None = None):
    """A shipped toy pipeline in fp32 (weights are stored in fp16), progress bars off: "toy" gives a
    StableDiffusionPipeline, "toy-mmdit" a StableDiffusion3Pipeline. path: load that folder instead
    (a pipeline of the same kind)."""
    import warnings

    import torch
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    folder = path or model_path(name)  # model_path also checks the name
    if name == "toy":
        cls, extra = StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    else:
        cls, extra = StableDiffusion3Pipeline, dict(text_encoder_3=None, tokenizer_3=None)
    with warnings.catch_warnings():  # newer diffusers call it `dtype`; older ones know only `torch_dtype`
        warnings.simplefilter("ignore", FutureWarning)
        pipe = cls.from_pretrained(folder, torch_dtype=dtype or torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_default_pipeline(device="cpu", dtype=None, path: str | None = None):
    """The shipped "toy" StableDiffusionPipeline (see load_pipeline)."""
    return load_pipeline("toy", device, dtype, path)


def load_classifier(path: str | None = None, device="cpu"):
    """The shipped shape-and-colour classifier (see fmn.toy.classifier)."""
    from fmn.toy.classifier import load_classifier as _load

    return _load(path, device)
