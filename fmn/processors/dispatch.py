"""fmn's public attention entry points for any supported model: `use_fused_attention`,
`concept_scores`, `zero_columns` and `suppress` hand a UNet (SD 1.x/2.x/XL) or its pipeline to
fmn.processors.attention, and an SD3 / FLUX transformer or pipeline to fmn.mmdit_attention. The signatures
are the same for both; the masks' width is the model's text length (UNet 77; SD3 77 + T5's;
FLUX T5's), see fmn.processors.spans.mmdit_text_mask."""
from contextlib import contextmanager

import fmn.processors.attention as unet_attention
import fmn.processors.mmdit_attention as mmdit_attention
from fmn.processors.mmdit_attention import is_mmdit


def use_fused_attention(model_or_pipe, *, backend="auto"):
    """Installs fmn's fused processors now; returns the handle (also a context manager) whose
    `remove()` restores the original processors."""
    module = mmdit_attention if is_mmdit(model_or_pipe) else unet_attention
    return module.use_fused_attention(model_or_pipe, backend=backend)


@contextmanager
def concept_scores(model_or_pipe, concept_weights, *, backend="auto"):
    """Records every text-reading attention layer's concept score while inside; yields the
    ConceptScores (`.scores`, `.layers`, `.loss()`). UNet: [B, H, N] per layer; MM-DiT: the image
    rows' [B, H, N_image] per joint layer."""
    module = mmdit_attention if is_mmdit(model_or_pipe) else unet_attention
    with module.concept_scores(model_or_pipe, concept_weights, backend=backend) as recorder:
        yield recorder


@contextmanager
def zero_columns(model_or_pipe, zero_mask, *, backend="auto"):
    """Zeroes the True text columns' attention probabilities while inside."""
    module = mmdit_attention if is_mmdit(model_or_pipe) else unet_attention
    with module.zero_columns(model_or_pipe, zero_mask, backend=backend):
        yield


@contextmanager
def suppress(pipe, concepts, *, include_eos=False, backend="auto"):
    """Generates with the concepts' attention zeroed (training-free preview); see
    fmn.processors.attention.suppress and fmn.processors.mmdit_attention.suppress (include_eos: UNet pipelines only)."""
    if is_mmdit(pipe):
        if include_eos:
            raise ValueError("include_eos is not supported for SD3 / FLUX pipelines (no single end-of-text column)")
        with mmdit_attention.suppress(pipe, concepts, backend=backend):
            yield pipe
    else:
        with unet_attention.suppress(pipe, concepts, include_eos=include_eos, backend=backend):
            yield pipe
