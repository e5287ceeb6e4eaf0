"""Diffusers attention processors: fused/score/suppress, dispatch, concept token spans."""
