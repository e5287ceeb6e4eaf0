"""fmn: Forget-Me-Not concept forgetting for diffusers models, fast.

Public names are imported lazily so that `import fmn` stays cheap and a CLI start is quick.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # diffusers integration (fmn/dispatch.py -> fmn/attention.py for UNets, fmn/mmdit_attention.py for
    # SD3 / FLUX; fmn/spans.py)
    "use_fused_attention": "fmn.dispatch",
    "concept_scores": "fmn.dispatch",
    "forgetting_loss": "fmn.attention",
    "suppress": "fmn.dispatch",
    "concept_token_mask": "fmn.spans",
    # the forgetting run and patch files (fmn/trainer.py, fmn/patch.py)
    "forget": "fmn.trainer",
    "forget_each": "fmn.batch",
    "Patch": "fmn.patch",
    "apply": "fmn.patch",
    "load_patch": "fmn.patch",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fmn' has no attribute {name!r}")
