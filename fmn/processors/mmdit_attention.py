"""Fused concept attention for MM-DiT models: SD3 / SD3.5 (joint) and FLUX.1 (double and single stream).

In an MM-DiT block text and image tokens share one softmax, so there is no separate
cross-attention map: the concept score is read from the joint probabilities,
q = k = v = the joint sequence, with `concept_weights` nonzero on the concept's text columns,
and only the image rows of the score kept. The processors here reproduce diffusers'
`JointAttnProcessor2_0` (SD3) and `FluxAttnProcessor` (FLUX) and run the attention through
`fmn_kernels.cross_attention`, so that scores (and their gradients) come without the
S x S probability maps.

Joint layouts: SD3 [image; text] (text = 77 CLIP columns, then T5's), FLUX [text; image]
(text = T5's; single-stream blocks get the concatenation already made, with
encoder_hidden_states=None, so their text length comes from the transformer call, recorded by a
forward pre-hook).

Per-call data lives in one `MMDiTContext` shared by all processors of a transformer (installed
by `use_fused_attention`, changed by the context managers below); a call may instead pass its own
through the pipeline's `joint_attention_kwargs={"fmn_context": ctx}`. Masks are [B, text_len],
batch-major like encoder_hidden_states, over the text columns only:
- concept_weights: record the image rows' scores sum_j w_j p_ij^2 ([B, H, N_image]);
- zero_mask (suppress): those text columns' probabilities are zeroed after the softmax (no
  renormalisation) for every row, image and text alike. Zeroing them for the text rows too means
  no token reads the concept's tokens at all, so the concept cannot reach the image through the
  other text tokens of later layers (the text stream is updated by attention in MM-DiT, unlike
  the fixed text states of a UNet).
Dispatch, as in fmn.attention: calls with neither mask are exactly the stock processors' attention
(SDPA; FLUX: diffusers' dispatch_attention_fn), zeroing alone is the same attention on values with
the zeroed columns' rows zeroed, and only concept scores run the fused kernel. The joint masks are
made once per transformer call (AttentionContext.derived) and nothing reads a GPU tensor on the host.
"""
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from fmn_kernels import cross_attention
from fmn_kernels.api import check_backend
from fmn.processors.attention import AttentionContext, ConceptScores, ProcessorSwap, checked_mask, using
from fmn.processors.spans import mmdit_text_mask, with_guidance

# Stock processors whose math the fused ones reproduce; anything else (IP-adapter, PAG, custom)
# would silently change the model, so installing over it is refused.
_SD3_PROCESSORS = {"JointAttnProcessor2_0", "FusedJointAttnProcessor"}
_FLUX_PROCESSORS = {"FluxAttnProcessor", "FusedFluxAttnProcessor"}


@dataclass
class MMDiTContext(AttentionContext):
    """fmn.attention's AttentionContext (concept_weights, zero_mask, recorder over the text
    columns) plus text_len, set by the transformer's forward pre-hook on every call (the length of
    its encoder_hidden_states): single-stream FLUX blocks need it to find the text columns."""
    text_len: int | None = None


def is_mmdit(model_or_pipe) -> bool:
    """True for an SD3 / FLUX transformer, or a pipeline holding one."""
    transformer = getattr(model_or_pipe, "transformer", model_or_pipe)
    return isinstance(transformer, (SD3Transformer2DModel, FluxTransformer2DModel))


def transformer_of(model_or_pipe):
    transformer = getattr(model_or_pipe, "transformer", model_or_pipe)
    if not isinstance(transformer, (SD3Transformer2DModel, FluxTransformer2DModel)):
        raise TypeError("expected an SD3Transformer2DModel, a FluxTransformer2DModel or a pipeline with one, "
                        f"got {type(model_or_pipe).__name__}")
    return transformer


class _FusedMMDiTProcessor:
    """Shared part: the joint attention through the fused op, with the context's masks."""

    def __init__(self, name: str, backend: str, context: MMDiTContext):
        self.name = name
        self.backend = backend
        self.context = context

    def joint_attention(self, query, key, value, text_len, text_first, context, sdpa):
        """query/key/value over the joint sequence, heads first [B, H, S, D] (text_first=False, SD3)
        or sequence first [B, S, H, D] (FLUX); returns the same layout. sdpa(q, k, v): the stock
        processor's attention, for calls without concept weights."""
        context = context or self.context
        weights, zero = self._joint_masks(context, query, text_len, text_first)
        if weights is None:
            if zero is not None:  # p_ij zeroed after the softmax == v_j zeroed: same output and gradients
                value = value.masked_fill(zero[:, :, None, None] if text_first else zero[:, None, :, None], 0)
            return sdpa(query, key, value)
        heads_first = (lambda t: t.transpose(1, 2)) if text_first else (lambda t: t)
        out, score = cross_attention(heads_first(query), heads_first(key), heads_first(value),
                                     scale=query.shape[-1] ** -0.5, concept_weights=weights, zero_mask=zero,
                                     backend=self.backend)
        if context.recorder is not None:
            joint_len = score.shape[-1]
            image_rows = slice(text_len, None) if text_first else slice(0, joint_len - text_len)
            context.recorder.add(self.name, score[:, :, image_rows])
        return heads_first(out)

    def _joint_masks(self, context, query, text_len, text_first):
        """The context's (concept_weights, zero_mask) over the joint columns [B, S] (or None), made
        once per call of the model."""
        if context.concept_weights is None and context.zero_mask is None:
            return None, None
        if text_len is None:
            raise ValueError(f"layer {self.name!r} got no text length: call the transformer itself "
                             "(its pre-hook records len(encoder_hidden_states)) with fmn's processors installed")
        shape = (query.shape[0], text_len, query.shape[1 if text_first else 2], text_first, query.device)
        return tuple(None if mask is None else context.derived(
            name, mask, shape, lambda m=mask, n=name: self._joint_mask(n, m, *shape))
            for name, mask in (("concept_weights", context.concept_weights), ("zero_mask", context.zero_mask)))

    def _joint_mask(self, name, mask, batch, text_len, joint_len, text_first, device):
        if tuple(mask.shape) != (batch, text_len):
            raise ValueError(f"{name} has shape {list(mask.shape)}, but joint attention layer {self.name!r} was "
                             f"called with a batch of {batch} and {text_len} text tokens: expected "
                             f"[{batch}, {text_len}], one row per encoder_hidden_states sample, batch-major")
        mask = mask.to(device)
        image = mask.new_zeros(batch, joint_len - text_len)
        return torch.cat([mask, image] if text_first else [image, mask], dim=1)


class FusedJointAttnProcessor(_FusedMMDiTProcessor):
    """diffusers' JointAttnProcessor2_0 (SD3, SD3.5) with the attention through the fused op.

    Joint layers ([image; text]) get the context's masks; calls without encoder_hidden_states
    (SD3.5's second, image-only attention) are plain SDPA, exactly as the stock processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                 fmn_context: MMDiTContext | None = None, **kwargs):
        # attention_mask is ignored, as by diffusers' JointAttnProcessor2_0.
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = _normed_heads(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q,
                                          attn.norm_k)

        if encoder_hidden_states is None:
            hidden_states = _sd3_sdpa(query, key, value)
        else:
            text_query, text_key, text_value = _normed_heads(
                encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
            hidden_states = self.joint_attention(query, key, value, encoder_hidden_states.shape[1], False, fmn_context,
                                                 _sd3_sdpa)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3])
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            image_len = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FusedFluxAttnProcessor(_FusedMMDiTProcessor):
    """diffusers' FluxAttnProcessor with the attention through the fused op.

    Double-stream blocks ([text; image], text = encoder_hidden_states) and single-stream blocks
    (called with the concatenation and encoder_hidden_states=None; the text length is the
    context's, recorded from the transformer call). RoPE is applied to the joint q and k as in
    the stock processor; fused QKV projections (attn.fuse_projections()) are followed too.
    """
    _attention_backend = None  # set by diffusers' set_attention_backend, as on FluxAttnProcessor
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, fmn_context: MMDiTContext | None = None):
        query, key, value, text_qkv = _flux_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if text_qkv is not None:
            text_query, text_key, text_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in text_qkv)
            query = torch.cat([attn.norm_added_q(text_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_key), key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attention_mask is not None:
            hidden_states = self._masked_attention(query, key, value, attention_mask, fmn_context)
        else:
            text_len = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None
                        else (fmn_context or self.context).text_len or self.context.text_len)
            hidden_states = self.joint_attention(query, key, value, text_len, True, fmn_context, self._stock_attention)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :text_len], hidden_states[:, text_len:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states

    def _masked_attention(self, query, key, value, attention_mask, fmn_context):
        """A user attention mask (joint_attention_kwargs) is SDPA's business: plain mode only."""
        context = fmn_context or self.context
        if context.concept_weights is not None or context.zero_mask is not None:
            raise ValueError(f"layer {self.name!r}: concept scores and suppression do not support an "
                             "attention_mask in joint_attention_kwargs")
        return self._stock_attention(query, key, value, attention_mask)

    def _stock_attention(self, query, key, value, attention_mask=None):
        """FluxAttnProcessor's attention call ([B, S, H, D]), with its backend settings."""
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)


def _sd3_sdpa(query, key, value):
    """JointAttnProcessor2_0's attention call ([B, H, S, D])."""
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


def _heads_first(x, heads):
    """[B, S, H*D] -> [B, H, S, D] (a strided view)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _normed_heads(states, heads, to_q, to_k, to_v, norm_q, norm_k):
    """One stream's q, k, v [B, H, S, D], with q and k normed where the layer has norms (SD3)."""
    query, key, value = (_heads_first(proj(states), heads) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def _flux_projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v of the image (or joint) stream [B, S, H*D] and the text stream's (or None)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, text
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    text = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states))
    return query, key, value, text


def joint_attention_layers(model_or_pipe) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every attention layer of an SD3 / FLUX transformer that fmn replaces:
    SD3's joint `attn` and SD3.5's image-only `attn2`; FLUX's double- and single-stream `attn`."""
    transformer = transformer_of(model_or_pipe)
    blocks = ("transformer_blocks", "single_transformer_blocks")
    layers = [(name, module) for name, module in transformer.named_modules()
              if name.split(".")[0] in blocks and name.rsplit(".", 1)[-1] in ("attn", "attn2")
              and hasattr(module, "processor")]
    if not layers:
        raise ValueError(f"{type(transformer).__name__} has no attention layers in its transformer blocks")
    return layers


class FusedMMDiTAttention(ProcessorSwap):
    """Handle of installed fused MM-DiT processors: `context` (shared MMDiTContext), `processors`;
    `remove()` (or leaving the `with`) puts back the original processors and removes the hook."""

    def __init__(self, model_or_pipe, backend="auto"):
        check_backend(backend)
        transformer = transformer_of(model_or_pipe)
        flux = isinstance(transformer, FluxTransformer2DModel)
        allowed, processor_class = ((_FLUX_PROCESSORS, FusedFluxAttnProcessor) if flux
                                    else (_SD3_PROCESSORS, FusedJointAttnProcessor))
        self.context = MMDiTContext()
        super().__init__(joint_attention_layers(transformer), allowed,
                         lambda name: processor_class(name, backend, self.context))
        self._hook = transformer.register_forward_pre_hook(self._record_text_len, with_kwargs=True)

    def _record_text_len(self, module, args, kwargs):
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.context.text_len = None if text is None else text.shape[1]

    def remove(self):
        super().remove()
        self._hook.remove()


def use_fused_attention(model_or_pipe, *, backend="auto") -> FusedMMDiTAttention:
    """Installs the fused MM-DiT processors now; returns the handle (also a context manager)."""
    return FusedMMDiTAttention(model_or_pipe, backend)


def _installed_context(transformer):
    """The shared context if fmn's processors are installed on every layer, else None."""
    processors = [module.processor for _, module in joint_attention_layers(transformer)]
    if all(isinstance(p, _FusedMMDiTProcessor) for p in processors):
        contexts = {id(p.context) for p in processors}
        if len(contexts) == 1:
            return processors[0].context
    return None


@contextmanager
def configured(model_or_pipe, backend="auto", **settings):
    """Sets the shared context's fields for the duration, installing the processors if needed."""
    transformer = transformer_of(model_or_pipe)
    context = _installed_context(transformer)
    handle = None if context is not None else FusedMMDiTAttention(transformer, backend)
    try:
        with using(context if handle is None else handle.context, **settings) as set_context:
            yield set_context
    finally:
        if handle is not None:
            handle.remove()


def _checked_mask(name, mask, allow_float, device):
    return checked_mask(name, mask, allow_float, device, "[B, text_len]", "batch-major, text columns only")


@contextmanager
def concept_scores(model_or_pipe, concept_weights, *, backend="auto"):
    """Records the image rows' concept scores ([B, H, N_image] each) of every joint layer while inside.

    concept_weights: [B, text_len] over the joint text columns (fmn.processors.spans.mmdit_text_mask:
    SD3 77 + T5 length, FLUX T5 length), batch-major like the transformer's encoder_hidden_states.
    """
    transformer = transformer_of(model_or_pipe)
    weights = _checked_mask("concept_weights", concept_weights, True, transformer.device)
    recorder = ConceptScores()
    with configured(transformer, backend, concept_weights=weights, recorder=recorder):
        yield recorder


@contextmanager
def zero_columns(model_or_pipe, zero_mask, *, backend="auto"):
    """Zeroes the True text columns' probabilities for every row of every joint layer while inside."""
    transformer = transformer_of(model_or_pipe)
    mask = _checked_mask("zero_mask", zero_mask, False, transformer.device)
    with configured(transformer, backend, zero_mask=mask):
        yield


@contextmanager
def suppress(pipe, concepts, *, backend="auto"):
    """fmn.suppress for StableDiffusion3Pipeline and FluxPipeline (see fmn.processors.attention.suppress).

    The pipeline's `encode_prompt` is wrapped for the duration; each call reads the prompts it
    gets (SD3: prompt, prompt_2, prompt_3; FLUX: prompt_2 or prompt, the T5 text) and
    max_sequence_length, and finds the concept's joint text columns (fmn.processors.spans.mmdit_text_mask).
    SD3 batches guidance as [negative, positive]: the negative half gets no columns. FLUX runs the
    negative prompt (true CFG) as its own transformer call: the first encode_prompt of a
    generation is the prompt, a second one before the transformer runs is the negative prompt,
    and transformer calls on the negative embeddings get no columns.
    """
    transformer = transformer_of(pipe)
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise TypeError(f"pipe must be a diffusers pipeline with encode_prompt, got {type(pipe).__name__}")
    if isinstance(concepts, str):
        concepts = [concepts]
    flux = isinstance(transformer, FluxTransformer2DModel)
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)
    had_own = "encode_prompt" in vars(pipe)
    found = []
    state = {"fresh": True, "positive": None, "mask": None}

    def concept_mask(given):
        prompt = given.get("prompt")
        if prompt is None:
            raise ValueError("fmn.suppress needs the prompt text to find the concept tokens; "
                             "the pipeline was called with prompt=None (prompt_embeds only?)")
        mask = mmdit_text_mask(pipe, prompt, concepts, prompt_2=given.get("prompt_2"),
                               prompt_3=given.get("prompt_3"), max_sequence_length=given.get("max_sequence_length"),
                               missing="ignore")
        found.append(bool(mask.any()))
        return mask.repeat_interleave(given.get("num_images_per_prompt") or 1, dim=0).to(transformer.device)

    with configured(transformer, backend, zero_mask=None) as context:
        def encode_prompt(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            given = call.arguments
            if not flux:
                mask = concept_mask(given)
                context.zero_mask = with_guidance(mask) if given.get("do_classifier_free_guidance") else mask
                return encode(*args, **kwargs)
            result = encode(*args, **kwargs)
            if state["fresh"]:  # FluxPipeline encodes the prompt first, then (true CFG) the negative prompt
                state.update(fresh=False, positive=result[0], mask=concept_mask(given))
            return result

        def choose_mask(module, args, kwargs):  # FLUX: the prompt's mask on the prompt's embeddings only
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            context.zero_mask = state["mask"] if text is state["positive"] else None
            state["fresh"] = True

        hook = transformer.register_forward_pre_hook(choose_mask, with_kwargs=True) if flux else None
        pipe.encode_prompt = encode_prompt
        try:
            yield pipe
        finally:
            if had_own:
                pipe.encode_prompt = encode
            else:
                del pipe.encode_prompt
            if hook is not None:
                hook.remove()
    if not any(found):
        warnings.warn(f"fmn.suppress: the concepts {list(concepts)} occurred in none of the prompts generated "
                      "inside the block (misspelt?); nothing was suppressed", stacklevel=3)
