"""diffusers integration: fused concept attention in the UNet's cross-attention layers.

`FusedCrossAttnProcessor` replaces diffusers' `AttnProcessor2_0` on every cross-attention
layer (`attn2`) of a UNet2DConditionModel and computes the attention through
`fmn_kernels.cross_attention`, so that one UNet call gives both the normal output and each
layer's concept score without materialising the attention maps. Self-attention layers keep
their own processors.

Per-call data reaches the processors through one explicit object, `AttentionContext`, shared by
all processors a `FusedAttention` handle installs (`handle.context`). It holds:
- `concept_weights` [B, 77]: record each layer's concept score sum_j w_j p_ij^2 ([B, H, N]) into
  `recorder` (`concept_scores`);
- `zero_mask` [B, 77] bool: zero those columns' probabilities after the softmax, not
  renormalised (`zero_columns`, `suppress`);
- neither: plain attention (`use_fused_attention`).
Dispatch: the Triton kernel only where it adds something. A call with neither mask (inference,
self-attention) is `F.scaled_dot_product_attention` with the caller's mask, exactly as
AttnProcessor2_0 (bit-identical); zeroing alone is the same SDPA on values with those key rows
zeroed (post-softmax zeroing without renormalisation is exactly that, output and gradients); only
concept scores need the fused kernel (or, with an additive bias the kernel does not take, the
materialising fallback: key length 77, cheap). Nothing here reads a GPU tensor on the host: no
synchronisation per layer.
The context managers below set it for the duration of a block and put back what was there.
(diffusers' `cross_attention_kwargs` would reach the self-attention processors too, which
warn on every call about keys they do not take.) Masks are batch-major, aligned with the
encoder_hidden_states batch the UNet is called with.
"""
import inspect
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from fmn_kernels import cross_attention
from fmn_kernels.api import check_backend
from fmn.processors.spans import concept_token_mask, with_guidance

# Processors whose math AttnProcessor2_0 reproduces; anything else (IP-adapter, custom
# processors with weights, fused QKV) would silently change the model, so installing over it is refused.
_PLAIN_PROCESSORS = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
                     "AttnProcessorNPU", "FusedCrossAttnProcessor"}


@dataclass
class AttentionContext:
    """What the fused processors do on the calls made while it is set (see the module docstring).

    `derived` keeps masks made from the ones set (e.g. MM-DiT's joint masks), so that they are
    made once per model call, not once per layer."""
    concept_weights: torch.Tensor | None = None
    zero_mask: torch.Tensor | None = None
    recorder: "ConceptScores | None" = None
    prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def derived(self, name, source, key, make):
        """make(), reused while `source` is the same tensor object, unchanged in place, and `key` (a
        tuple of host values: shapes, dtype, device) is equal; one entry per name."""
        tag = (source._version, key)
        hit = self.prepared.get(name)
        if hit is not None and hit[0] is source and hit[1] == tag:
            return hit[2]
        value = make()
        self.prepared[name] = (source, tag, value)
        return value


class FusedCrossAttnProcessor:
    """AttnProcessor2_0 for cross-attention, computed by fmn_kernels.cross_attention.

    Every branch of AttnProcessor2_0 is kept (spatial_norm, 4-D inputs, attention masks,
    group_norm, norm_cross, norm_q/norm_k, residual_connection, rescale_output_factor); the
    softmax scale is `attn.scale`, passed explicitly.
    """

    def __init__(self, name: str = "", backend: str = "auto", context: AttentionContext | None = None):
        self.name = name
        self.backend = backend
        self.context = context if context is not None else AttentionContext()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch, key_len, _ = (encoder_hidden_states if is_cross else hidden_states).shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # [B, seq, H*D] -> [B, H, seq, D] as strided views: the kernel takes them without copies.
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_cross:
            hidden_states = self._cross_attention(attn, query, key, value, attention_mask)
        else:  # called as self-attention: no text columns, so exactly AttnProcessor2_0
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _cross_attention(self, attn, query, key, value, bias):
        """SDPA unless a concept score is wanted (see the module docstring). Like AttnProcessor2_0,
        the SDPA calls use SDPA's own scale (D ** -0.5), the kernel calls `attn.scale` (the same for
        every diffusers model that scales q.k)."""
        batch, key_len = key.shape[0], key.shape[2]
        weights = _fit_mask("concept_weights", self.context.concept_weights, batch, key_len, query.device, self.name)
        zero = _fit_mask("zero_mask", self.context.zero_mask, batch, key_len, query.device, self.name)
        if weights is None:
            if zero is not None:  # p_ij zeroed after the softmax == v_j zeroed: same output and gradients
                value = value.masked_fill(zero[:, None, :, None], 0)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        if bias is not None:  # the kernel takes key masks only; telling one from a bias would read the GPU
            out, score = _materialised_attention(query, key, value, attn.scale, bias, weights, zero)
        else:
            out, score = cross_attention(query, key, value, scale=attn.scale, concept_weights=weights,
                                         zero_mask=zero, backend=self.backend)
        self._record(score)
        return out

    def _record(self, score):
        if score is not None and self.context.recorder is not None:
            self.context.recorder.add(self.name, score)


def _fit_mask(name, mask, batch, key_len, device, layer):
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, key_len):
        raise ValueError(f"{name} has shape {list(mask.shape)}, but cross-attention layer {layer!r} was called "
                         f"with a batch of {batch} and {key_len} text tokens: expected [{batch}, {key_len}], "
                         "one row per encoder_hidden_states sample, batch-major")
    return mask.to(device, non_blocking=True)


def _materialised_attention(query, key, value, scale, bias, weights, zero):
    """Attention with a general additive bias, in fp32 with the N x L map in memory."""
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else logits + bias.float()
    probs = logits.softmax(-1)
    kept = probs if zero is None else probs * (~zero)[:, None, None, :]
    out = torch.matmul(kept, value.float()).to(query.dtype)
    score = None if weights is None else (probs.square() * weights.float()[:, None, None, :]).sum(-1)
    return out, score


class ConceptScores:
    """Per-call concept scores recorded by `concept_scores`, in the autograd graph.

    `scores[i]` is the [B, H, N] float32 score of the i-th cross-attention call, `layers[i]` the
    name of its layer; several UNet calls append in order.
    """

    def __init__(self):
        self.scores = []
        self.layers = []

    def add(self, layer, score):
        self.layers.append(layer)
        self.scores.append(score)

    def loss(self):
        return forgetting_loss(self.scores)

    def clear(self):
        self.scores.clear()
        self.layers.clear()


def forgetting_loss(scores) -> torch.Tensor:
    """The Forget-Me-Not attention loss: sqrt(sum over layers of score.sum()).

    Equals the L2 norm of all concept columns' probabilities of all layers, as in the authors' code.
    At 0 (no concept column anywhere) the loss is 0 with a zero gradient, like torch.norm's.
    """
    total = score_total(scores)
    # sqrt's gradient at 0 is inf; route 0 through a constant branch instead. NaN stays NaN, so a
    # broken score surfaces in the loss rather than reading as "already forgotten".
    zero = total == 0
    return torch.where(zero, torch.zeros_like(total), torch.where(zero, torch.ones_like(total), total).sqrt())


def score_total(scores) -> torch.Tensor:
    """The sum of every recorded concept score (the forgetting loss is its square root): a sum over
    samples, so that data-parallel processes can add theirs up (fmn.forgetting.losses)."""
    if isinstance(scores, ConceptScores):
        scores = scores.scores
    if isinstance(scores, torch.Tensor):
        scores = [scores]
    if not isinstance(scores, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in scores):
        raise TypeError(f"scores must be a list of tensors, got {type(scores).__name__}")
    if not scores:
        raise ValueError("scores is empty: no cross-attention layer ran with concept weights "
                         "(call the UNet inside fmn.concept_scores)")
    return torch.stack([s.float().sum() for s in scores]).sum()


def _unet_of(unet_or_pipe):
    unet = getattr(unet_or_pipe, "unet", unet_or_pipe)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError("unet_or_pipe must be a UNet2DConditionModel or a pipeline with a .unet, "
                        f"got {type(unet_or_pipe).__name__}")
    return unet


def cross_attention_layers(unet_or_pipe) -> list[tuple[str, Attention]]:
    """(name, module) of every cross-attention layer (`attn2`) of the UNet."""
    unet = _unet_of(unet_or_pipe)
    layers = [(name, module) for name, module in unet.named_modules()
              if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2" and module.is_cross_attention]
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers")
    return layers


class ProcessorSwap:
    """Processors installed on attention layers, the originals kept: `processors`; `remove()` (or
    leaving the `with`) puts back the original processor objects. Shared by the UNet's and the
    MM-DiT handles."""

    def __init__(self, layers, allowed, make_processor):
        """layers [(name, module)]; every layer's processor class must be named in `allowed` (the
        ones the fused processor reproduces); make_processor(name) -> the processor to install."""
        for name, module in layers:
            kind = type(module.processor).__name__
            if kind not in allowed:
                raise ValueError(f"layer {name!r} uses {kind}, which fmn's fused processor does not reproduce; "
                                 f"expected one of {sorted(allowed)}")
        self._originals = [(module, module.processor) for _, module in layers]
        for name, module in layers:
            module.set_processor(make_processor(name))

    @property
    def processors(self) -> list:
        return [module.processor for module, _ in self._originals]

    def remove(self):
        for module, original in self._originals:
            module.set_processor(original)
        self._originals = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class FusedAttention(ProcessorSwap):
    """Handle of installed fused processors (`context`: their shared AttentionContext)."""

    def __init__(self, unet_or_pipe, backend="auto"):
        check_backend(backend)
        self.context = AttentionContext()
        super().__init__(cross_attention_layers(unet_or_pipe), _PLAIN_PROCESSORS,
                         lambda name: FusedCrossAttnProcessor(name, backend, self.context))


def use_fused_attention(unet_or_pipe, *, backend="auto") -> FusedAttention:
    """Installs fused cross-attention on every attn2 layer now; returns the handle (also a
    context manager) whose `remove()` restores the original processors."""
    return FusedAttention(unet_or_pipe, backend)


@contextmanager
def using(context: AttentionContext, **fields):
    """Sets fields of `context` for the duration of the block, then puts back what was there."""
    saved = {key: getattr(context, key) for key in fields}
    try:
        for key, value in fields.items():
            setattr(context, key, value)
        yield context
    finally:
        for key, value in saved.items():
            setattr(context, key, value)


@contextmanager
def recording(context: AttentionContext, concept_weights):
    """Inside, every fused processor reading `context` records its concept score for
    concept_weights [B, L] (batch-major); yields the ConceptScores. The trainer's way in, given
    the context of the processors it installed (model families other than the UNet's included)."""
    recorder = ConceptScores()
    with using(context, concept_weights=concept_weights, recorder=recorder):
        yield recorder


@contextmanager
def _context_set(unet_or_pipe, backend, **settings):
    """Sets the fused processors' AttentionContext fields for the duration, installing the
    processors if needed; yields the context(s) set (one unless processors were installed one by one)."""
    layers = cross_attention_layers(unet_or_pipe)
    installed = all(isinstance(module.processor, FusedCrossAttnProcessor) for _, module in layers)
    handle = None if installed else FusedAttention(unet_or_pipe, backend)
    contexts = list({id(m.processor.context): m.processor.context for _, m in layers}.values())
    try:
        with ExitStack() as stack:
            for c in contexts:
                stack.enter_context(using(c, **settings))
            yield contexts
    finally:
        if handle is not None:
            handle.remove()


def checked_mask(name, mask, allow_float, device, layout="[B, 77]", order="batch-major"):
    """A user's [B, columns] mask on `device`, after checking its type, rank and dtype (shared with
    fmn.processors.mmdit_attention, whose masks cover the joint text columns)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout} ({order}), got shape {list(mask.shape)}")
    if mask.dtype != torch.bool and not (allow_float and mask.is_floating_point()):
        raise TypeError(f"{name} must be {'bool or floating point' if allow_float else 'bool'}, got {mask.dtype}")
    return mask.to(device)


@contextmanager
def concept_scores(unet_or_pipe, concept_weights, *, backend="auto"):
    """Records every cross-attention layer's concept score while inside.

    concept_weights: [B, 77] bool/float, batch-major like the encoder_hidden_states the UNet
    will get (for a guidance batch, see fmn.processors.spans.with_guidance). Yields a `ConceptScores`:
    `.scores`, `.layers`, `.loss()` (= forgetting_loss(scores)), `.clear()`.
    """
    weights = checked_mask("concept_weights", concept_weights, True, _unet_of(unet_or_pipe).device)
    recorder = ConceptScores()
    with _context_set(unet_or_pipe, backend, concept_weights=weights, recorder=recorder):
        yield recorder


@contextmanager
def zero_columns(unet_or_pipe, zero_mask, *, backend="auto"):
    """Zeroes the True columns' attention probabilities (after softmax, no renormalisation) in
    every cross-attention layer while inside. zero_mask: [B, 77] bool, batch-major."""
    mask = checked_mask("zero_mask", zero_mask, False, _unet_of(unet_or_pipe).device)
    with _context_set(unet_or_pipe, backend, zero_mask=mask):
        yield


@contextmanager
def suppress(pipe, concepts, *, include_eos=False, backend="auto"):
    """Generates with the concepts' attention zeroed: training-free forgetting preview.

    Inside, `pipe(prompt=...)` zeroes the columns of the concept tokens in every cross-attention
    layer, for the conditional half of the batch only. How: the pipeline instance's
    `encode_prompt` is wrapped for the duration; each call reads its `prompt` (and SDXL's
    `prompt_2`), `num_images_per_prompt` and `do_classifier_free_guidance`, finds the concept
    columns with `concept_token_mask`, repeats each prompt's row num_images_per_prompt times
    (as encode_prompt does) and, with guidance, prepends zero rows for the unconditional half,
    relying on diffusers' [negative, positive] concatenation. SDXL's two tokenizers give the
    same positions for the same text; a different `prompt_2` adds its own matches.

    The pipeline must be called with `prompt` text, not only `prompt_embeds`. Prompts without the
    concepts are generated as they are, so a long prompt list can be generated in batches; if no
    call inside the block held any of the concepts, leaving it warns (most likely a misspelt
    concept). Nested `suppress` calls do not combine: the innermost wins.
    """
    if not callable(getattr(pipe, "encode_prompt", None)) or getattr(pipe, "tokenizer", None) is None:
        raise TypeError(f"pipe must be a diffusers pipeline with encode_prompt and a tokenizer, "
                        f"got {type(pipe).__name__}")
    if isinstance(concepts, str):
        concepts = [concepts]
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)
    had_own = "encode_prompt" in vars(pipe)

    found = []
    with _context_set(pipe, backend, zero_mask=None) as contexts:
        def encode_prompt(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            given = call.arguments
            prompt = given.get("prompt")
            if prompt is None:
                raise ValueError("fmn.suppress needs the prompt text to find the concept tokens; "
                                 "the pipeline was called with prompt=None (prompt_embeds only?)")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            # A batch may mix prompts with and without the concepts, or hold none of them.
            mask = concept_token_mask(pipe.tokenizer, prompts, concepts, include_eos=include_eos, missing="ignore")
            if concept_token_mask(pipe.tokenizer, prompts, concepts, missing="ignore").any():
                found.append(True)
            prompt_2 = given.get("prompt_2")
            if prompt_2 is not None and getattr(pipe, "tokenizer_2", None) is not None:
                prompts_2 = [prompt_2] if isinstance(prompt_2, str) else list(prompt_2)
                if prompts_2 != prompts:
                    mask |= concept_token_mask(pipe.tokenizer_2, prompts_2, concepts, include_eos=include_eos,
                                               missing="ignore")
            mask = mask.repeat_interleave(given.get("num_images_per_prompt") or 1, dim=0)
            if given.get("do_classifier_free_guidance"):
                mask = with_guidance(mask)
            mask = mask.to(pipe.unet.device)
            for c in contexts:
                c.zero_mask = mask
            return encode(*args, **kwargs)

        pipe.encode_prompt = encode_prompt
        try:
            yield pipe
        finally:
            if had_own:
                pipe.encode_prompt = encode
            else:
                del pipe.encode_prompt
    if not found:
        warnings.warn(f"fmn.suppress: the concepts {list(concepts)} occurred in none of the prompts generated "
                      "inside the block (misspelt?); nothing was suppressed", stacklevel=3)
