"""Fused scaled-dot-product attention with the Forget-Me-Not concept score, in Triton."""
from .api import MAX_HEAD_DIM, cross_attention
from .reference import concept_attention_reference

__all__ = ["cross_attention", "concept_attention_reference", "MAX_HEAD_DIM"]
__version__ = "0.1.0"
