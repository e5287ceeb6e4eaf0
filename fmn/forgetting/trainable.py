"""Trainable sets: what a run trains (a named set of the denoiser's parameters, or a LoRA adapter
on them, through peft), and putting the denoiser's weights back (or merging the trained ones) after."""
from __future__ import annotations

import torch

from fmn.patches.patch import fingerprint

ADAPTER = "fmn"  # the peft adapter name of a train="lora" run


def lora_scale(opts) -> float:
    """LoRA's alpha / rank (alpha defaults to the rank)."""
    return (opts.lora_alpha if opts.lora_alpha is not None else opts.lora_rank) / opts.lora_rank


class TrainableSet:
    """The parameters a run trains (or edits in closed form), in fp32, and what is needed to give the weights back.

    `named`: (name, parameter) pairs trained; `edited`: (name, input kind, layer) of a closed-form edit
    (opts.closed_form; fmn.forgetting.closed_form); `saved`: the base tensors of both (CPU copies); `fingerprint`: of
    the base tensors the result will touch (fmn.patches.patch.fingerprint).
    Filled step by step, so that `restore` also undoes a set-up that failed half way.
    """

    def __init__(self, family, opts):
        self.family, self.opts = family, opts
        self.named, self.saved, self.lora, self.fingerprint = [], {}, False, {}
        self.edited = []  # (name, input kind, layer) a closed-form edit changes (fmn.forgetting.closed_form)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    def touched(self) -> dict:
        """{name: parameter} of everything the run changes: the trained set and the closed-form edit's weights."""
        return dict(self.named) | {n: layer.weight for n, _, layer in self.edited}

    def prefixed(self, name) -> str:
        return f"{self.family.component}.{name}"

    def setup(self):
        model = self.family.denoiser
        if self.opts.train == "lora" and getattr(model, "peft_config", None):
            raise ValueError("the UNet already has LoRA adapters; fuse or unload them before a train='lora' run")
        model.requires_grad_(False)
        if self.opts.train == "lora":
            self._add_lora(model)
        else:
            self.named = self.family.trainable(self.opts.train)
            if self.opts.closed_form:
                self.edited = self.family.closed_form_layers()
            touched = self.touched()
            self.fingerprint = fingerprint(self.family.pipe, [self.prefixed(n) for n in touched])
            for n, p in touched.items():
                self.saved[n] = p.detach().to("cpu", copy=True)
                if p.dtype != torch.float32:
                    p.data = p.data.float()  # fp32 master weights
            for _, p in self.named:
                p.requires_grad_(True)
        return self

    def _add_lora(self, model):
        from peft import LoraConfig
        opts = self.opts
        alpha = opts.lora_alpha if opts.lora_alpha is not None else opts.lora_rank
        model.add_adapter(LoraConfig(r=opts.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=self.family.lora_targets()), adapter_name=ADAPTER)
        self.lora = True
        self.named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        for _, p in self.named:
            p.data = p.data.float()
            p.requires_grad_(True)
        touched = sorted({self.prefixed(n.split(".lora_")[0] + ".weight") for n, _ in self.named})
        self.fingerprint = fingerprint(self.family.pipe, touched)

    def trained(self) -> dict:
        """{name: trained tensor (fp32, CPU)}: peft's adapter state dict for LoRA, else the set."""
        if self.lora:
            from peft.utils import get_peft_model_state_dict
            state = get_peft_model_state_dict(self.family.denoiser, adapter_name=ADAPTER)
            return {k: v.detach().float().cpu() for k, v in state.items()}
        return {n: p.detach().float().cpu() for n, p in self.touched().items()}

    @torch.no_grad()
    def restore(self, keep: bool):
        """Base weights back (keep=False), or the trained ones kept in the model's dtype, a LoRA
        merged into its base weights (keep=True); the adapter removed either way."""
        model = self.family.denoiser
        if self.lora:
            merged = self._lora_deltas() if keep else {}
            model.unload_lora()
            for stem, d in merged.items():
                w = model.get_submodule(stem).weight
                w.copy_((w.float() + d.reshape(w.shape).to(w.device)).to(w.dtype))
        named = dict(model.named_parameters())
        for n, base in self.saved.items():
            p = named[n]
            if keep:
                p.data = p.data.to(base.dtype)
            else:
                p.data = base.to(p.device)

    def _lora_deltas(self) -> dict:
        scale, sd = lora_scale(self.opts), dict(self.named)
        return {n.split(".lora_A.")[0]: scale * (sd[n.replace(".lora_A.", ".lora_B.")].float() @ a.float())
                for n, a in sd.items() if ".lora_A." in n}
