"""Options of a forgetting run (`ForgetOptions`) and the choices the CLI offers for them."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from fmn_kernels.api import BACKENDS, check_backend

TEMPLATES = {
    "object": ["a photo of {}"],
    "style": ["a photo in the style of {}"],
}
TRAIN_SETS = ("attn2", "attn2-kv", "unet", "lora")
LOSSES = ("attention", "visual", "both")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8,
                "exact": None}


@dataclass
class ForgetOptions:
    """Options of a forgetting run; defaults are the paper's / the authors' unless noted."""
    steps: int = 35
    lr: float | None = None            # None: 2e-6 (authors), or 1e-4 for train="lora"
    batch_size: int = 1
    seed: int = 0
    resolution: int | None = None      # None: unet.config.sample_size * vae_scale_factor
    train: str = "attn2"               # attn2 | attn2-kv | unet | lora
    loss: str = "attention"            # attention | visual | both
    visual_weight: float = 1.0         # weight of the visual loss in "both"
    template: str | list = "object"    # object | style | list of templates with "{}"
    n_images: int | None = None        # generated per concept; None: 4 on tiny models, 10 otherwise
    gen_steps: int = 30                # inference steps when generating reference images
    guidance_scale: float = 7.5
    timesteps: tuple = (0, 1000)       # uniform in [lo, hi)
    include_eos: bool = False          # also mark end-of-text slots (authors' "use_pooler")
    retain: tuple = ()                 # phrases to keep (not in the paper): their outputs held to the base's
    retain_weight: float = 1.0         # weight of the retain loss
    retain_samples: int = 32           # cached (noisy latent, timestep, retain prompt) -> base output
    retain_images: int | None = None   # images generated per retain phrase (None: n_images); 0: noise the
                                       # concept's own images instead (cheaper, holds less)
    anchor: str | tuple = ()           # what each concept should become (Concept Ablation's anchor, not in the
                                       # paper): one phrase, or one per concept; its outputs held to the base's
                                       # with the anchor in the concept's place
    anchor_weight: float = 1.0         # weight of the anchor loss
    closed_form: bool = False          # after training, the anchor edit solved in closed form on the layers
                                       # that read the text (fmn.forgetting.closed_form, UCE; not in the paper): the
                                       # concept's prompts -> the anchor's ("" without an anchor), the retained
                                       # phrases' and the empty prompt kept; steps=0: the edit alone
    preserve_weight: float = 1.0       # closed form: weight of the kept prompts against the concept's
    preserve_base: bool = False        # closed form: the kept prompts held to the base weights' outputs, not the
                                       # trained ones' (what training moved on them goes back)
    closed_form_rounds: int = 0        # closed form: adversarial rounds (RECE) that also edit the embeddings
                                       # found to bring the concept back through the edited layers
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float | None = None  # gradient clipping (off, as in effect in the authors' code)
    lora_rank: int = 4
    lora_alpha: float | None = None    # None: = rank
    precision: str = "fp32"            # fp32 | bf16 | fp16 (autocast; trained tensors kept in fp32)
    gradient_checkpointing: bool = False
    backend: str = "auto"              # fused attention backend: auto | triton | cpu | reference
    inversion: bool = False
    inversion_steps: int = 500
    inversion_tokens: int = 4
    inversion_lr: float = 1e-3
    inversion_weight_decay: float = 0.1
    inversion_norm: float = 0.4        # new embeddings' norm pulled towards this ...
    inversion_norm_factor: float = 0.1  # ... by this factor after each step
    patch_dtype: str = "fp16"          # fp16 | bf16 | fp32 | int8 deltas, or "exact" replacements
    inplace: bool = False              # leave the trained weights in the pipeline
    offload: bool = True               # text encoders and VAE to the CPU during training (CUDA only)
    cuda_graphs: bool = True           # CUDA: the steps' denoiser calls replayed as CUDA graphs (cuda_graphs.py);
                                       # a failed capture falls back to eager with a warning
    device: str | None = None          # None: accelerate's device
    data_parallel: bool = True         # under an accelerate launch / torchrun: each process computes its part of
                                       # every step's batch of processes x batch_size (distributed.py); False:
                                       # this process trains alone (fmn.batch spreads concepts that way)
    progress: bool = True
    base_model: str | None = None      # recorded in the patch; None: pipe.name_or_path

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            bad(f"steps must be an int >= 1 (>= 0 with closed_form), got {self.steps!r}")
        if not isinstance(self.closed_form, bool):
            bad(f"closed_form must be True or False, got {self.closed_form!r}")
        if not isinstance(self.cuda_graphs, bool):
            bad(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.steps == 0 and not self.closed_form:
            bad("steps must be >= 1 unless closed_form=True (steps=0: the closed-form edit alone)")
        if self.closed_form and self.train == "lora":
            bad("closed_form edits the base weights and cannot be combined with train='lora'")
        if not (self.preserve_weight > 0 and math.isfinite(self.preserve_weight)):
            bad(f"preserve_weight must be positive, got {self.preserve_weight!r}")
        if not isinstance(self.preserve_base, bool):
            bad(f"preserve_base must be True or False, got {self.preserve_base!r}")
        if isinstance(self.closed_form_rounds, bool) or not isinstance(self.closed_form_rounds, int) \
                or self.closed_form_rounds < 0:
            bad(f"closed_form_rounds must be an int >= 0, got {self.closed_form_rounds!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.train not in TRAIN_SETS:
            bad(f"train must be one of {TRAIN_SETS}, got {self.train!r}")
        if self.loss not in LOSSES:
            bad(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.patch_dtype not in PATCH_DTYPES:
            bad(f"patch_dtype must be one of {tuple(PATCH_DTYPES)}, got {self.patch_dtype!r}")
        if self.lr is None:
            self.lr = 1e-4 if self.train == "lora" else 2e-6
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be positive, got {self.lr!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad(f"resolution must be a multiple of 8, got {self.resolution!r}")
        lo, hi = self.timesteps
        if not 0 <= lo < hi:
            bad(f"timesteps must be (lo, hi) with 0 <= lo < hi, got {self.timesteps!r}")
        self.timesteps = (int(lo), int(hi))
        if self.lora_rank < 1:
            bad(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.n_images is not None and self.n_images < 1:
            bad(f"n_images must be >= 1, got {self.n_images}")
        if self.inversion_tokens < 1 or self.inversion_steps < 0:
            bad("inversion_tokens must be >= 1 and inversion_steps >= 0")
        check_backend(self.backend)
        templates(self.template)  # validates
        if isinstance(self.retain, str):
            self.retain = (self.retain,)
        if not isinstance(self.retain, (list, tuple)) or not all(isinstance(r, str) and r.strip()
                                                                  for r in self.retain):
            bad(f"retain must be a list of non-empty phrases, got {self.retain!r}")
        self.retain = tuple(r.strip() for r in self.retain)
        if not (self.retain_weight > 0 and math.isfinite(self.retain_weight)):
            bad(f"retain_weight must be positive, got {self.retain_weight!r}")
        if isinstance(self.retain_samples, bool) or not isinstance(self.retain_samples, int) \
                or self.retain_samples < 1:
            bad(f"retain_samples must be a positive int, got {self.retain_samples!r}")
        if self.retain_images is not None and (isinstance(self.retain_images, bool)
                                               or not isinstance(self.retain_images, int) or self.retain_images < 0):
            bad(f"retain_images must be None or an int >= 0, got {self.retain_images!r}")
        if isinstance(self.anchor, str):
            self.anchor = (self.anchor,) if self.anchor.strip() else ()
        if not isinstance(self.anchor, (list, tuple)) or not all(isinstance(a, str) and a.strip()
                                                                  for a in self.anchor):
            bad(f"anchor must be a phrase or a list of non-empty phrases (one per concept), got {self.anchor!r}")
        self.anchor = tuple(a.strip() for a in self.anchor)
        if not (self.anchor_weight > 0 and math.isfinite(self.anchor_weight)):
            bad(f"anchor_weight must be positive, got {self.anchor_weight!r}")

    def record(self) -> dict:
        """The options as stored in the patch metadata."""
        d = asdict(self)
        for k in ("progress", "device", "base_model", "inplace", "offload", "cuda_graphs", "data_parallel"):
            d.pop(k)
        return json.loads(json.dumps(d))  # tuples as lists: what a patch file gives back


def templates(template) -> list[str]:
    if isinstance(template, str):
        if template in TEMPLATES:
            return list(TEMPLATES[template])
        template = [template]
    if not isinstance(template, (list, tuple)) or not template:
        raise ValueError(f"template must be 'object', 'style' or a list of templates with '{{}}', got {template!r}")
    out = []
    for t in template:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"a custom template must contain '{{}}' exactly once (where the concept goes), got {t!r}")
        out.append(t)
    return out


class ForgetError(RuntimeError):
    """The run failed (non-finite loss, ...); the pipeline was restored and nothing was written."""


__all__ = ["ForgetOptions", "ForgetError", "templates", "TEMPLATES", "TRAIN_SETS", "LOSSES", "PRECISIONS",
           "PATCH_DTYPES", "BACKENDS"]
