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

from fmn.processors.tokenizer import clip_tokenizer

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


# ---------------------------------------------------------------------------------------------
# Tiny MM-DiT pipelines (SD3 / SD3.5 and FLUX.1), offline: random weights from configs, the CLIP
# tokenizer from fmn's shipped BPE, a small trained T5 tokenizer (fmn.processors.tokenizer.t5_tokenizer).
# The VAE downsamples 8x like the real ones, so 64 px images give 8x8 latents: 16 image tokens
# (SD3 patch 2; FLUX packs 2x2). Every component is in eval mode (T5 has dropout).
# ---------------------------------------------------------------------------------------------
MMDIT_KINDS = ("sd3", "flux")
MMDIT_IMAGE_SIZE = 64
MMDIT_T5_LENGTH = {"sd3": 32, "flux": 32}  # a short max_sequence_length that tests can pass


def _mmdit_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=MMDIT_IMAGE_SIZE,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5)


def _t5_encoder(tokenizer, d_model=64):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.1, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def tiny_sd3_pipeline(seed=0, dual_attention=True):
    """A tiny random StableDiffusion3Pipeline: 2 joint blocks with 2 heads of 16 (rms_norm QK norm,
    the first block with SD3.5's second, image-only attention when dual_attention), CLIP-L/G of
    width 32 each (concatenated 64 = the joint text width), T5 of width 64."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from fmn.processors.tokenizer import t5_tokenizer
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=MMDIT_IMAGE_SIZE // 8, patch_size=2, in_channels=4,
                                        out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=16, qk_norm="rms_norm",
                                        dual_attention_layers=(0,) if dual_attention else ())
    torch.manual_seed(seed + 1)
    vae = _mmdit_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(text_config(32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(32, projection_dim=32))
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = _t5_encoder(tokenizer_3)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                    text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"),
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return _eval(pipe)


def tiny_flux_pipeline(seed=0, guidance_embeds=True):
    """A tiny random FluxPipeline: 1 double-stream and 2 single-stream blocks with 2 heads of 16,
    RoPE axes (4, 6, 6), T5 of width 64 as the sequence text, CLIP (width 32) pooled; guidance
    embedding as in FLUX.1-dev (guidance_embeds=False: schnell's layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from fmn.processors.tokenizer import t5_tokenizer
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed + 1)
    vae = _mmdit_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(32))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = _t5_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    return _eval(pipe)


def tiny_mmdit_pipeline(kind="sd3", seed=0):
    """tiny_sd3_pipeline or tiny_flux_pipeline by name."""
    if kind not in MMDIT_KINDS:
        raise ValueError(f"kind must be one of {MMDIT_KINDS}, got {kind!r}")
    return tiny_sd3_pipeline(seed) if kind == "sd3" else tiny_flux_pipeline(seed)


def _eval(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


class MaterializedSDPA:
    """Replaces torch's scaled_dot_product_attention while inside `with`: explicit fp32
    softmax(q k^T * scale) v, every probability map kept in `probs` ([B, H, S, L] each, in call
    order). Stock diffusers processors (JointAttnProcessor2_0, FluxAttnProcessor through the
    native dispatch) call it by attribute, so this is the materialising oracle and baseline for
    MM-DiT layers, independent of fmn's processors. Only mask-free, non-causal calls are supported.
    zero_mask [B, L] bool: in calls with L keys, those columns' probabilities are zeroed after the
    softmax (no renormalisation) before multiplying by V.
    """

    def __init__(self, zero_mask=None):
        self.probs = []
        self.zero_mask = zero_mask
        self._original = None

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal or dropout_p:
            raise ValueError("MaterializedSDPA supports only mask-free, non-causal, dropout-free attention")
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        probs = (torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale).softmax(-1)
        self.probs.append(probs)
        if self.zero_mask is not None and self.zero_mask.shape[-1] == key.shape[2]:
            probs = probs * (~self.zero_mask)[:, None, None, :]
        return torch.matmul(probs, value.float()).to(query.dtype)

    def __enter__(self):
        self._original = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._original
