"""fmn: Forget-Me-Not concept forgetting for diffusers models, fast."""
__version__ = "0.1.0"
