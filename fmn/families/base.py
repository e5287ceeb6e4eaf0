"""The model-family seam: what the trainer asks of a model family, and nothing more.

A family (SD 1.x/2.x/XL UNets today: fmn.families.unet) answers how prompts are encoded, where a
concept's key columns are, how the denoiser is called, how latents are noised and what the
training target is, which attention layers and trainable sets exist, and its default options.
The trainer (fmn.trainer and the modules it calls) talks to a pipeline only through it, so a new
family (SD3, FLUX: MM-DiT, flow matching) is one new module with one `ModelFamily` subclass,
registered in `fmn.families.FAMILIES`.

Adding a family: subclass ModelFamily in fmn/families/<name>.py and answer every abstract method;
its fused processors read one fmn.processors.attention.AttentionContext per handle (concept_weights [B, L] ->
record sum_j w_j p_ij^2 into context.recorder; zero_mask [B, L] -> zero those columns after the
softmax), as fmn.processors.attention.FusedCrossAttnProcessor does for attn2; list the class in
fmn.families.FAMILIES (before a family whose matches() could also accept its pipelines).

Conventions: timesteps `t` are integer training timesteps in [0, timestep_count()) (a
flow-matching family maps them to its sigmas inside add_noise / target / predict / x0_estimate);
latents are the denoiser's input space (scaled VAE latents); prompt rows and key-column masks are
batch-major, one row per prompt.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class Prompts:
    """Encoded prompts, one row per prompt: what the denoiser is conditioned on.

    embeds [P, L, D] and pooled [P, D2] (or None) as the family's encode_prompts returns them;
    concept_of [P]: which concept (or phrase) each prompt names; columns [P, L] bool: the concept's
    key columns (None where no attention loss needs them); resolution: the image size in pixels
    (for families whose denoiser takes size conditioning).
    """
    embeds: torch.Tensor
    pooled: torch.Tensor | None
    concept_of: list
    columns: torch.Tensor | None = None
    resolution: int = 0
    by_concept: list = field(init=False, repr=False)

    def __post_init__(self):
        self.concept_of = torch.tensor(self.concept_of)
        self.by_concept = [torch.nonzero(self.concept_of == c).flatten()
                           for c in range(int(max(self.concept_of)) + 1)]


class ModelFamily(ABC):
    """One model family's answers to the trainer. Construct with the pipeline: `Family(pipe)`."""

    name: ClassVar[str]                     # e.g. "unet"
    component: ClassVar[str]                # the pipeline attribute trained and patched ("unet", "transformer")
    train_sets: ClassVar[tuple[str, ...]]   # the `train` option's values this family offers

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    @abstractmethod
    def matches(cls, pipe) -> bool:
        """Whether this family handles `pipe`."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module trained (UNet, transformer)."""
        return getattr(self.pipe, self.component)

    # --- text
    @abstractmethod
    def text_parts(self) -> list[tuple]:
        """[(tokenizer, text_encoder), ...] in the order encode_prompts uses them."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], parts=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds [P, L, D], pooled [P, D2] or None) as the family's pipeline encodes them;
        differentiable (concept inversion trains through it). `parts`: other (tokenizer, encoder)
        pairs than the pipeline's, e.g. inversion's copies."""

    @abstractmethod
    def concept_columns(self, prompts: list[str], phrases: list[str], *, include_eos: bool = False,
                        parts=None) -> torch.Tensor:
        """[P, L] bool: the key columns of the denoiser's text keys holding phrases[i] in prompts[i];
        a ValueError naming the phrase and prompt if it does not occur."""

    # --- the denoiser
    @abstractmethod
    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, prompts: Prompts,
                rows: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for latents x_t [B, ...] at timesteps t [B], conditioned on the
        prompts' rows [B]. `model` is the denoiser, possibly wrapped (accelerate, DDP)."""

    # --- noise and targets
    @abstractmethod
    def timestep_count(self) -> int:
        """Training timesteps are integers in [0, timestep_count())."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: clean latents x0 noised to timesteps t."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at x_t = add_noise(x0, noise, t)."""

    @abstractmethod
    def x0_estimate(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latents the denoiser's output implies (the visual loss compares these)."""

    # --- attention and trainable sets
    @abstractmethod
    def attention_layers(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of the attention layers whose text columns the attention loss reads."""

    @abstractmethod
    def fused_attention(self, backend: str):
        """Installs fmn's fused processors on attention_layers(); returns a handle with `.remove()`
        and `.context`: the one fmn.processors.attention.AttentionContext all of them read on every call
        (the trainer records concept scores through it with fmn.processors.attention.recording)."""

    @abstractmethod
    def suppress(self, concepts: list[str], *, include_eos: bool = False, backend: str = "auto"):
        """A context manager inside which `self.pipe(prompt=...)` generates with the concepts' key
        columns zeroed in the attention layers (the visual loss's targets are drawn so)."""

    @abstractmethod
    def trainable(self, train: str) -> list[tuple[str, torch.nn.Parameter]]:
        """The denoiser's (name, parameter) pairs of trainable set `train` (not "lora")."""

    def closed_form_layers(self) -> list[tuple[str, str, torch.nn.Linear]]:
        """(parameter name, input kind, layer) of every linear layer a closed-form edit changes (fmn.closed_form;
        which ones: fmn.patches.patch_check.CLOSED_FORM_LAYERS): input kind "embeds" reads the prompts' token
        embeddings, "pooled" the pooled text vector."""
        from fmn.patches.patch_check import CLOSED_FORM_LAYERS

        kinds = CLOSED_FORM_LAYERS[self.component]
        return [(f"{n}.weight", kind, m) for n, m in self.denoiser.named_modules() if isinstance(m, torch.nn.Linear)
                for kind, keep in kinds.items() if keep(f"{n}.weight")]

    @abstractmethod
    def lora_targets(self) -> list[str]:
        """Module-name suffixes a train="lora" adapter wraps (peft target_modules)."""

    # --- defaults
    @abstractmethod
    def default_resolution(self) -> int:
        """Training image size in pixels when the options leave it unset."""

    def default_options(self, concepts, given: dict | None = None) -> dict:
        """ForgetOptions values this family (or this very model) prefers over the paper's defaults for
        forgetting `concepts` (none by default). `given`: the options the caller set, for defaults that
        depend on them; the caller's options always win over what this returns. fmn.forget and
        `fmn forget` both ask here, so the two paths train with the same options."""
        return {}

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for `self.pipe(...)` that make it encode prompts as encode_prompts does
        (none by default; MM-DiT: its T5 length)."""
        return {}

    def pipeline_latents(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """The pipeline's output_type="latent" images in the denoiser's latent space, shaped like
        VAE-encoded reference images (identity by default; FLUX unpacks its 2x2-packed latents)."""
        return latents


def tuned_defaults(forget_defaults, concepts, given=None) -> dict:
    """A built-in model's tuned options for `concepts` (`forget_defaults(concepts, anchor=..., method=...)`),
    picked under what was given: by default the attention re-steering then the closed-form edit; steps=0 the
    closed-form edit alone; closed_form=False (or train="lora") the attention rule alone; anchor "" / [] the
    options without an anchor; train="lora" keeps the LoRA learning rate."""
    given = given or {}
    anchor = given.get("anchor")
    anchored = anchor is None or bool(anchor.strip() if isinstance(anchor, str) else anchor)
    if given.get("closed_form") is False or given.get("train") == "lora":  # lora trains an adapter only
        method = "attention"
    elif given.get("steps") == 0:
        method = "closed-form"
    else:
        method = "attention+closed-form"
    opts = forget_defaults(concepts, anchor=anchored, method=method)
    if given.get("train") == "lora":
        opts.pop("lr", None)
    return opts
