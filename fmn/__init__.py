"""fmn: Forget-Me-Not concept forgetting for diffusers models, fast.

Public names are imported lazily so that `import fmn` stays cheap and a CLI start is quick.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # diffusers integration (fmn/processors/: dispatch.py -> attention.py for UNets, mmdit_attention.py
    # for SD3 / FLUX; spans.py)
    "use_fused_attention": "fmn.processors.dispatch",
    "concept_scores": "fmn.processors.dispatch",
    "forgetting_loss": "fmn.processors.attention",
    "suppress": "fmn.processors.dispatch",
    "concept_token_mask": "fmn.processors.spans",
    # the forgetting run and patch files (fmn/forgetting/trainer.py, fmn/patches/patch.py)
    "forget": "fmn.forgetting.trainer",
    "forget_each": "fmn.forgetting.batch",
    "Patch": "fmn.patches.patch",
    "apply": "fmn.patches.patch",
    "load_patch": "fmn.patches.patch",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fmn' has no attribute {name!r}")
