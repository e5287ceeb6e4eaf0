"""The SD 1.x / 2.x / XL family: a UNet2DConditionModel with cross-attention (`attn2`), CLIP text
encoders (SDXL: two, pooled embeddings and size conditioning), a DDPM-family scheduler."""
from __future__ import annotations

import torch

from fmn.processors.attention import cross_attention_layers, suppress, use_fused_attention
from fmn.families.base import ModelFamily, Prompts, tuned_defaults
from fmn.processors.spans import concept_token_mask

TRAINABLE = {
    "attn2": lambda n: ".attn2." in n,
    "attn2-kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
    "unet": lambda n: True,
}
LORA_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


class UNetFamily(ModelFamily):
    name = "unet"
    component = "unet"
    train_sets = ("attn2", "attn2-kv", "unet", "lora")

    @classmethod
    def matches(cls, pipe) -> bool:
        return isinstance(getattr(pipe, "unet", None), torch.nn.Module)

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe.unet.config, "addition_embed_type", None) == "text_time"

    # --- text
    def text_parts(self):
        pipe = self.pipe
        parts = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                 (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
        parts = [(t, e) for t, e in parts if t is not None and e is not None]
        if not parts:
            raise ValueError(f"{type(pipe).__name__} has no tokenizer/text_encoder: not a Stable Diffusion pipeline")
        return parts

    def encode_prompts(self, prompts, parts=None):
        """As the pipelines' encode_prompt: SD the last hidden state; SDXL the penultimate hidden
        states of both encoders concatenated, and the pooled projection of the last."""
        parts = parts or self.text_parts()
        sdxl = self.is_sdxl
        embeds, pooled = [], None
        for tok, enc in parts:
            tokens = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                         return_tensors="pt")
            ids = tokens.input_ids.to(enc.device)
            if sdxl:
                out = enc(ids, output_hidden_states=True)
                if out[0].ndim == 2:
                    pooled = out[0]
                embeds.append(out.hidden_states[-2])
            else:
                mask = None
                if getattr(enc.config, "use_attention_mask", False):
                    mask = tokens.attention_mask.to(enc.device)
                embeds.append(enc(ids, attention_mask=mask)[0])
        return torch.cat(embeds, dim=-1), pooled

    def concept_columns(self, prompts, phrases, *, include_eos=False, parts=None):
        tok = (parts or self.text_parts())[0][0]  # SDXL's two tokenizers place the same text alike
        return torch.cat([concept_token_mask(tok, [p], [c], include_eos=include_eos)
                          for p, c in zip(prompts, phrases)])

    # --- the denoiser
    def predict(self, model, x_t, t, prompts: Prompts, rows):
        kw = {}
        if prompts.pooled is not None:
            res = prompts.resolution
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=x_t.device, dtype=torch.float32)
            kw["added_cond_kwargs"] = {"text_embeds": prompts.pooled[rows], "time_ids": time_ids.expand(len(rows), -1)}
        return model(x_t, t, encoder_hidden_states=prompts.embeds[rows], **kw).sample

    # --- noise and targets (the scheduler's own formulas)
    def _alphas(self, device):
        ac = getattr(self.pipe.scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(f"scheduler {type(self.pipe.scheduler).__name__} has no alphas_cumprod: "
                             "not a DDPM-family scheduler")
        return ac.to(device, torch.float32)

    def prediction_type(self) -> str:
        return getattr(self.pipe.scheduler.config, "prediction_type", "epsilon")

    def timestep_count(self):
        return getattr(self.pipe.scheduler.config, "num_train_timesteps", len(self._alphas("cpu")))

    def add_noise(self, x0, noise, t):
        self._alphas(x0.device)
        return self.pipe.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        kind = self.prediction_type()
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.pipe.scheduler.get_velocity(x0, noise, t)
        return x0

    def x0_estimate(self, x_t, output, t):
        kind = self.prediction_type()
        a = self._alphas(x_t.device)[t].view(-1, 1, 1, 1)
        if kind == "epsilon":
            return (x_t - (1 - a).sqrt() * output) / a.sqrt()
        if kind == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * output
        if kind == "sample":
            return output
        raise ValueError(f"unsupported prediction_type {kind!r}")

    # --- attention and trainable sets
    def attention_layers(self):
        return cross_attention_layers(self.pipe.unet)

    def fused_attention(self, backend):
        return use_fused_attention(self.pipe.unet, backend=backend)

    def suppress(self, concepts, *, include_eos=False, backend="auto"):
        return suppress(self.pipe, concepts, include_eos=include_eos, backend=backend)

    def trainable(self, train):
        keep = TRAINABLE[train]
        params = [(n, p) for n, p in self.pipe.unet.named_parameters() if keep(n)]
        if not params:
            raise ValueError(f"the UNet has no parameters for train={train!r} (no cross-attention layers?)")
        return params

    def lora_targets(self):
        return list(LORA_TARGETS)

    # --- defaults
    def default_options(self, concepts, given=None):
        """On the built-in toy model (is_builtin_toy): its tuned defaults (fmn.toy.defaults.forget_defaults)
        for `concepts`; given anchor "" / [] (no anchor) picks its defaults without one, and given
        train="lora" keeps the LoRA learning rate. Any other UNet: none (the paper's)."""
        if not self.is_builtin_toy():
            return {}
        from fmn.toy.defaults import forget_defaults
        return tuned_defaults(forget_defaults, concepts, given)

    def is_builtin_toy(self) -> bool:
        """Whether the pipeline was loaded from the shipped toy model's folder (fmn.toy.paths.is_built_in:
        its name_or_path resolves to fmn.toy.default_model_path()). A copy saved elsewhere, or a pipeline
        built in memory, is not: it gets the paper's defaults (pass fmn.toy.defaults.forget_defaults(concepts)
        yourself)."""
        try:
            from fmn.toy.paths import is_built_in
        except ImportError:  # an install without the toy model
            return False
        return is_built_in(self.pipe, "toy")

    def default_resolution(self):
        return int(self.pipe.unet.config.sample_size) * getattr(self.pipe, "vae_scale_factor", 8)
