"""What a forgetting run changes on a pipeline besides weights, recorded before and put back after:
devices of its modules, requires_grad flags, train/eval mode, gradient checkpointing."""
from __future__ import annotations

import torch

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


class PipelineState:
    """Recorded at construction; `restore()` puts it back (after the trainable set's weights)."""

    def __init__(self, pipe, model: torch.nn.Module):
        self.model = model
        self.modules = {n: m for n, m in ((n, getattr(pipe, n, None)) for n in COMPONENTS)
                        if isinstance(m, torch.nn.Module)}
        self.devices = {n: next(m.parameters()).device for n, m in self.modules.items()}
        self.grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.was_training = model.training
        self.had_checkpointing = getattr(model, "is_gradient_checkpointing", False)

    def offload_text_and_vae(self):
        """Text encoders and VAE to the CPU (CUDA runs, once the text is encoded)."""
        for m in self.modules.values():
            if m is not self.model:
                m.to("cpu")
        torch.cuda.empty_cache()

    def restore(self):
        model = self.model
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(self.grad_flags.get(n, p.requires_grad))
        if getattr(model, "is_gradient_checkpointing", False) and not self.had_checkpointing:
            model.disable_gradient_checkpointing()
        model.train(self.was_training)
        for n, m in self.modules.items():
            if next(m.parameters()).device != self.devices[n]:
                m.to(self.devices[n])
