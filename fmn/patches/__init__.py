"""Patch files: format, checks, low-rank compression, LoRA export."""
