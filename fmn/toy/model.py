"""Builders for the toy Stable-Diffusion-structured pipeline (same diffusers/transformers classes as SD 1.x).

VAE: AutoencoderKL, 32 px RGB <-> 4 x 16 x 16 latents (down factor 2).
Tokenizer: CLIPTokenizer with CLIP's BPE restricted to the captions' words (588 tokens; the words
split as in SD 1.x's tokenizer, any other word into smaller pieces), padded with end-of-text; 8 slots
(the "joint" recipe: 77).
Text encoder: CLIPTextModel, hidden 64. Shipped ("tokens" recipe): no attention layers (each slot is
layer-norm(token + position embedding)), trained with the UNet, so every slot holds its own word and
the UNet reads its words, as SD's does. "joint" recipe: 2 causal layers trained with the UNet on the
full vocabulary, then pruned (prune_vocabulary); it writes the prompt into the end slots. "words"
recipe: 2 layers, random and frozen.
UNet: UNet2DConditionModel with cross-attention (attn2) in every block, sample_size 16 -> 32 px images.
Scheduler: DDPM for training (SD's scaled-linear betas, 1000 steps); DDIM saved for inference.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_HIDDEN = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16
TEXT_SLOTS = 8  # the longest caption ("a picture of a purple triangle") fills them with its start and end tokens
SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, steps_offset=1)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=16, sample_size=32, mid_block_add_attention=False,
    )


def build_tokenizer(text_slots: int = TEXT_SLOTS):
    from fmn.processors.tokenizer import clip_tokenizer
    from fmn.toy.data import vocabulary
    return clip_tokenizer(pad_token="<|endoftext|>", model_max_length=text_slots, words=vocabulary())


def build_text_encoder(tokenizer, layers: int = 2) -> CLIPTextModel:
    """layers=0 gives an encoder without attention: each slot is LN(token + position embedding)."""
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_unet(channels=(64, 128), heads: int = 4) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=heads, norm_num_groups=32,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_KW)


def build_inference_scheduler() -> DDIMScheduler:
    kw = dict(SCHEDULER_KW)
    return DDIMScheduler(**kw, set_alpha_to_one=False)


def prune_vocabulary(tokenizer, text_encoder: CLIPTextModel, words):
    """A small-vocabulary copy of (tokenizer, text_encoder) that encodes `words` exactly as before.

    The small tokenizer keeps CLIP's BPE only for `words` (fmn.processors.tokenizer.clip_tokenizer(words=...)),
    so those words split into the same token strings; the encoder keeps the embedding rows of those
    strings, everything else unchanged. Prompts made of `words` give bit-identical outputs; other
    words split into smaller pieces. Cuts the toy encoder from 49408 rows (6.3 MB in fp16) to 588."""
    from fmn.processors.tokenizer import clip_tokenizer

    small = clip_tokenizer(pad_token=tokenizer.pad_token, model_max_length=tokenizer.model_max_length, words=words)
    full_ids = tokenizer.get_vocab()
    strings = sorted(small.get_vocab(), key=small.get_vocab().get)
    missing = [s for s in strings if s not in full_ids]
    if missing:
        raise ValueError(f"tokenizer lacks tokens of the small vocabulary: {missing[:5]}")
    rows = torch.tensor([full_ids[s] for s in strings])
    cfg = text_encoder.config.to_dict()
    cfg.update(vocab_size=len(small), bos_token_id=small.bos_token_id, eos_token_id=small.eos_token_id,
               pad_token_id=small.pad_token_id)
    pruned = CLIPTextModel(CLIPTextConfig.from_dict(cfg)).to(text_encoder.dtype)
    state = dict(text_encoder.state_dict())
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    state[key] = state[key][rows]
    pruned.load_state_dict(state)
    return small, pruned.eval()
