"""Tiny offline Stable Diffusion pipelines for tests: random weights, real CLIP tokenizers.

Each builder mirrors the architecture family it stands for, at toy sizes:
- "sd1": CLIP text encoder (end-of-text padding), UNet with an int `attention_head_dim`
  (read by diffusers as the number of heads), conv in/out projections.
- "sd2": tokenizer padding with "!" (id 0), `attention_head_dim` as a per-block list and
  linear in/out projections, like SD 2.x.
- "sdxl": two text encoders (the second with projection), their hidden states concatenated as
  cross-attention context, "text_time" added conditioning, transformer depth > 1.

Latents are 8x8 (images 16x16 px) so that a full pipeline call takes well under a second.
"""
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fmn.tokenizer import clip_tokenizer

KINDS = ("sd1", "sd2", "sdxl")
SAMPLE_SIZE = 8  # latent side; the VAE below halves once, so images are 16 px


def text_config(hidden_size, projection_dim=None):
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                          hidden_act="quick_gelu", **extra)


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                         norm_num_groups=32, sample_size=2 * SAMPLE_SIZE)


def _scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_unet(kind="sd1", seed=0) -> UNet2DConditionModel:
    """A tiny UNet2DConditionModel of the given family (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    common = dict(sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                  layers_per_block=1, norm_num_groups=32)
    if kind == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if kind == "sd2":
        # heads (2, 4) over channels (32, 64): head dim 16 everywhere, as SD 2.x keeps 64.
        return UNet2DConditionModel(**common, cross_attention_dim=48, attention_head_dim=(2, 4),
                                    use_linear_projection=True,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # sdxl: cross-attention only at the lower resolution, 2 transformer layers per block.
    return UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=(2, 4),
                                use_linear_projection=True, transformer_layers_per_block=(1, 2),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                # 6 time ids x 8 + the second encoder's pooled projection (32)
                                projection_class_embeddings_input_dim=6 * 8 + 32)


def tiny_sd_pipeline(kind="sd1", seed=0):
    """A StableDiffusionPipeline ("sd1", "sd2") or StableDiffusionXLPipeline ("sdxl"), tiny and random."""
    unet = tiny_unet(kind, seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    if kind == "sd1":
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config(32))
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                       unet=unet, scheduler=_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if kind == "sd2":
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config(48))
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder,
                                       tokenizer=clip_tokenizer(pad_token="!"), unet=unet,
                                       scheduler=_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(32, projection_dim=32))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                                     unet=unet, scheduler=_scheduler(), add_watermarker=False)


def save_tiny_pipeline(path, kind="sd1", seed=0):
    """Writes tiny_sd_pipeline(kind, seed) to `path`; `from_pretrained(path)` loads it offline."""
    pipe = tiny_sd_pipeline(kind, seed)
    pipe.save_pretrained(str(path))
    return pipe


class MaterializingCrossAttnProcessor:
    """Cross-attention as the authors' code runs it: diffusers' classic AttnProcessor math
    ([B*H, N, L] maps from baddbmm + softmax, then bmm), every probability map kept in memory
    and the concept columns selected from it. Independent of fmn.attention: the test oracle
    and the benchmark baseline.

    concept_mask [B, L] bool: columns whose probabilities are collected in `selected`
    (rows laid out batch-major, b * H + h, the layout head_to_batch_dim gives).
    zero_mask [B, L] bool: those rows of V are set to zero, i.e. attention on masked values.
    """

    def __init__(self, concept_mask=None, zero_mask=None):
        self.concept_mask = concept_mask
        self.zero_mask = zero_mask
        self.selected = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, key_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        if self.zero_mask is not None:
            keep = (~self.zero_mask.to(value.device)).repeat_interleave(attn.heads, dim=0)
            value = value * keep[:, :, None].to(value.dtype)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.concept_mask is not None:
            rows = self.concept_mask.to(probs.device).repeat_interleave(attn.heads, dim=0)
            self.selected.append(probs.transpose(1, 2)[rows])  # [selected columns, N]
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def loss(self):
        """The authors' loss: the L2 norm of every selected probability."""
        return torch.cat([s.flatten() for s in self.selected]).norm()


def set_cross_attention_processor(unet, processor) -> dict:
    """Sets `processor` on every attn2 layer of `unet`; returns {name: original processor}."""
    originals = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False):
            originals[name] = module.processor
            module.set_processor(processor)
    return originals
