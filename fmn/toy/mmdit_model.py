"""Builders for the toy MM-DiT pipeline (same diffusers/transformers classes as Stable Diffusion 3).

StableDiffusion3Pipeline with:
VAE: the UNet toy model's AutoencoderKL (32 px RGB <-> 4 x 16 x 16 latents), reused as trained, with
  SD3's latent convention z = (latent - shift_factor) * scaling_factor.
Tokenizers: the UNet toy model's CLIPTokenizer (CLIP's BPE kept for the captions' words, 8 slots),
  twice (SD3's CLIP-L and CLIP-G slots).
Text encoders: two CLIPTextModelWithProjection with one layer. SD3 reads the penultimate hidden
  state per slot, which with one layer is the embedding output (token + position embedding): every
  slot holds its own word, as in the UNet toy model's "tokens" recipe. The layer only feeds the
  pooled projection, which the transformer ignores (below).
No T5 (text_encoder_3=None): the pipeline then appends `max_sequence_length` (default 256) zero
  tokens; the model is trained with them (see PadCollapsedJointAttnProcessor for how cheaply).
Transformer: SD3Transformer2DModel (joint attention: text and image tokens in one softmax), patch 2
  -> 8 x 8 image tokens. Its pooled-text projection is zero and frozen (zero_pooled_projection): the
  prompt reaches the image only through the text tokens in joint attention, so forgetting a word
  can be specific; real SD3 also feeds CLIP's pooled vector to its AdaLN modulation.
Scheduler: FlowMatchEulerDiscreteScheduler (shift 1: the images are tiny).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from fmn.toy import model as unet_model

TEXT_HIDDEN = 64  # per CLIP encoder; the two are concatenated -> joint_attention_dim 128
TEXT_PROJECTION = 32  # per CLIP encoder -> pooled_projection_dim 64
T5_SLOTS = 256  # the pipeline's default max_sequence_length: zero tokens appended after the CLIP slots
PATCH = 2


def build_tokenizer():
    return unet_model.build_tokenizer(unet_model.TEXT_SLOTS)


def build_text_encoder(tokenizer) -> CLIPTextModelWithProjection:
    """One layer: the penultimate hidden state SD3 reads is then the embedding output of each slot."""
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
        projection_dim=TEXT_PROJECTION, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg)


def build_transformer(dim: int = 128, layers: int = 6, head_dim: int = 32) -> SD3Transformer2DModel:
    if dim % head_dim:
        raise ValueError(f"dim must be a multiple of head_dim, got dim={dim}, head_dim={head_dim}")
    transformer = SD3Transformer2DModel(
        sample_size=unet_model.LATENT_SIZE, patch_size=PATCH, in_channels=unet_model.LATENT_CHANNELS,
        out_channels=unet_model.LATENT_CHANNELS, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim, joint_attention_dim=2 * TEXT_HIDDEN, caption_projection_dim=dim,
        pooled_projection_dim=2 * TEXT_PROJECTION, pos_embed_max_size=unet_model.LATENT_SIZE // PATCH,
        qk_norm="rms_norm",
    )
    zero_pooled_projection(transformer)
    return transformer


def zero_pooled_projection(transformer: SD3Transformer2DModel) -> None:
    """Zero and freeze the projection of the pooled text vector into the timestep embedding."""
    proj = transformer.time_text_embed.text_embedder
    with torch.no_grad():
        for p in proj.parameters():
            p.zero_()
    proj.requires_grad_(False)


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_unet_toy_vae(path: str) -> AutoencoderKL:
    """The shipped UNet toy pipeline's VAE in fp32 (its scaling_factor is 1 / std of its training latents)."""
    return AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).eval()


def clip_slots(text_encoders, ids):
    """(per-slot states [B, slots, 2 * TEXT_HIDDEN], pooled [B, 2 * TEXT_PROJECTION]) as
    StableDiffusion3Pipeline.encode_prompt computes them from CLIP token ids (penultimate hidden
    states concatenated; pooled projections concatenated); differentiable."""
    states, pooled = [], []
    for enc in text_encoders:
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)


class PadCollapsedJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 for a context whose last token stands for `pad_count`
    identical tokens (the pipeline's zero T5 tokens).

    SD3's text tokens carry no positional embedding and every op but attention acts per token, so
    identical zero tokens stay identical through every block; in the softmax, n identical keys with
    the same value equal one key whose logit is raised by log(n). Training with one such token and
    this processor therefore computes what the pipeline computes with 256 zero tokens, at 73
    instead of 328 tokens per image (tests/toy/test_toy_mmdit.py checks the equality). Training draws
    the count per sample (log-uniform in 1..256), so that the model serves any max_sequence_length:
    the default 256, or 1 for speed."""

    def __init__(self, pad_count: int = T5_SLOTS):
        self.set_count(pad_count)

    def set_count(self, pad_count) -> None:
        """pad_count: an int, or a tensor [B] of counts per sample (training draws them)."""
        counts = torch.as_tensor(pad_count, dtype=torch.float32)
        if (counts < 1).any():
            raise ValueError(f"pad_count must be >= 1, got {pad_count}")
        self.log_count = counts.log().reshape(-1, 1, 1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("PadCollapsedJointAttnProcessor needs encoder_hidden_states (joint attention)")
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(self.log_count.shape[0], 1, q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., -1] = self.log_count.to(bias)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


def set_pad_collapsed(transformer: SD3Transformer2DModel, pad_count=T5_SLOTS) -> PadCollapsedJointAttnProcessor:
    """Give every attention layer one shared PadCollapsedJointAttnProcessor; returns it (set_count changes all)."""
    proc = PadCollapsedJointAttnProcessor(pad_count)
    transformer.set_attn_processor(proc)
    return proc


def set_default_attention(transformer: SD3Transformer2DModel) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
