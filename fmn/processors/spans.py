"""Concept token spans: which of the 77 text slots hold a concept, per prompt.

As in the authors' code, a concept is found by token-id subsequence matching: the prompt is
tokenized exactly as the pipelines do it (padded to 77, truncated), the concept phrase without
special tokens, and every occurrence of the phrase's ids is marked. Matches are searched only
in the prompt's own tokens (between start-of-text and the first end-of-text), so that padding
never matches. `include_eos` also marks every slot holding the end-of-text id, as the authors'
"use_pooler" option does: with SD 1.x tokenizers (padding with end-of-text) that is every
padding slot, with SD 2.x ones (padding with "!") only the real end-of-text slot.

Masks are batch-major: row b belongs to prompts[b], the layout of the text embeddings the UNet
gets. For a classifier-free-guidance batch use `with_guidance`, which gives the unconditional
half no concept columns.
"""
import inspect
import re

import torch


def _as_prompt_list(prompts):
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r}")
    return list(prompts)


def _concepts_per_prompt(concepts, n_prompts):
    """A list (one per prompt) of lists of phrases, from the two accepted forms."""
    if isinstance(concepts, str):
        concepts = [concepts]
    if not isinstance(concepts, (list, tuple)) or not concepts:
        raise TypeError(f"concepts must be a non-empty list of phrases, or one list of phrases per prompt; "
                        f"got {concepts!r}")
    if all(isinstance(c, str) for c in concepts):
        return [list(concepts)] * n_prompts
    if all(isinstance(c, (list, tuple)) and c and all(isinstance(p, str) for p in c) for c in concepts):
        if len(concepts) != n_prompts:
            raise ValueError(f"concepts given per prompt must have one list per prompt ({n_prompts}), "
                             f"got {len(concepts)}")
        return [list(c) for c in concepts]
    raise TypeError("concepts must be a list of str, or a list (one per prompt) of non-empty lists of str; "
                    f"got {concepts!r}")


def _find(ids: list[int], phrase: list[int], start: int, stop: int) -> list[int]:
    """Start positions of every occurrence of `phrase` inside ids[start:stop]."""
    n = len(phrase)
    return [i for i in range(start, stop - n + 1) if ids[i:i + n] == phrase]


def concept_token_mask(tokenizer, prompts, concepts, *, include_eos=False, max_length=None,
                       missing="raise") -> torch.Tensor:
    """[len(prompts), max_length] bool mask of the concept slots of each prompt.

    Args:
        tokenizer: the pipeline's CLIP tokenizer (SD 1.x, 2.x, or either of SDXL's).
        prompts: list of prompts (a single str is taken as one prompt).
        concepts: phrases searched in every prompt, or a list (one per prompt) of lists of phrases.
        include_eos: also mark every slot holding the end-of-text id (the authors' "use_pooler").
        max_length: sequence length, default tokenizer.model_max_length (77).
        missing: "raise" (default): a phrase absent from a prompt is a ValueError; "ignore":
            it marks nothing there.
    """
    prompts = _as_prompt_list(prompts)
    per_prompt = _concepts_per_prompt(concepts, len(prompts))
    if missing not in ("raise", "ignore"):
        raise ValueError(f"missing must be 'raise' or 'ignore', got {missing!r}")
    max_length = tokenizer.model_max_length if max_length is None else max_length
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length).input_ids
    eos = tokenizer.eos_token_id
    phrase_ids = {}
    mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
    for b, (prompt, row) in enumerate(zip(prompts, ids)):
        # The prompt's own tokens: after start-of-text, before the first end-of-text.
        start = 1 if row[0] == tokenizer.bos_token_id else 0
        stop = row.index(eos, start) if eos in row[start:] else len(row)
        for concept in per_prompt[b]:
            if concept not in phrase_ids:
                phrase_ids[concept] = tokenizer(concept, add_special_tokens=False).input_ids
                if not phrase_ids[concept]:
                    raise ValueError(f"concept {concept!r} gives no tokens")
            phrase = phrase_ids[concept]
            found = _find(row, phrase, start, stop)
            if not found and missing == "raise":
                full = tokenizer(prompt, add_special_tokens=False).input_ids
                cut = " (it falls past the truncation)" if _find(full, phrase, 0, len(full)) else ""
                raise ValueError(f"concept {concept!r} does not occur in prompt {prompt!r}{cut} "
                                 f"(max_length {max_length})")
            for i in found:
                mask[b, i:i + len(phrase)] = True
        if include_eos:
            mask[b] |= torch.tensor(row) == eos
    return mask


def with_guidance(mask: torch.Tensor) -> torch.Tensor:
    """[2B, L] mask for a classifier-free-guidance batch: no concept columns for the
    unconditional half, in diffusers' [negative, positive] concatenation order."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise TypeError(f"mask must be a [B, L] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    return torch.cat([torch.zeros_like(mask), mask])


# ---------------------------------------------------------------------------------------------
# Spans from character offsets: any fast tokenizer (CLIP, T5), and the joint text columns of
# MM-DiT pipelines (SD3, FLUX).
#
# Token-id matching fails on T5 (cased, "▁" word markers: "(Van Gogh)" gives "▁ ( V an ▁ G o gh )",
# and "Van Gogh" alone gives "▁ V an ..."). Here a concept is found in the prompt text instead:
# case-insensitive, bounded by non-word characters, any run of whitespace in the concept matching
# any run in the prompt; every non-special token whose character span overlaps a match is marked.
# ---------------------------------------------------------------------------------------------

def concept_char_spans(text: str, concept: str) -> list[tuple[int, int]]:
    """(start, end) character spans of every case-insensitive, word-bounded occurrence of `concept`."""
    words = concept.split()
    if not words:
        raise ValueError(f"concept {concept!r} is empty")
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def concept_offset_mask(tokenizer, prompts, concepts, *, max_length: int, missing="raise") -> torch.Tensor:
    """[len(prompts), max_length] bool mask of the tokens that spell a concept, from character offsets.

    Works for every fast tokenizer with offset mappings (CLIP, T5). The prompts are tokenized as
    the pipelines do it (padded to max_length, truncated); max_length must be the pipeline's
    (CLIP 77; T5 256 for SD3 and FLUX.1-schnell, 512 for FLUX.1-dev), not the tokenizer's
    model_max_length. missing: "raise" (a phrase absent from a prompt, or cut by truncation, is a
    ValueError) or "ignore".
    """
    prompts = _as_prompt_list(prompts)
    per_prompt = _concepts_per_prompt(concepts, len(prompts))
    if missing not in ("raise", "ignore"):
        raise ValueError(f"missing must be 'raise' or 'ignore', got {missing!r}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer must be a fast tokenizer with offset mappings, got {type(tokenizer).__name__}")
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                        return_offsets_mapping=True, return_special_tokens_mask=True)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        offsets = encoded.offset_mapping[b]
        special = encoded.special_tokens_mask[b]
        tokens = [(i, s, e) for i, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and e > s]
        for concept in per_prompt[b]:
            spans = concept_char_spans(prompt, concept)
            hits = [i for i, s, e in tokens if any(s < end and e > start for start, end in spans)]
            if missing == "raise":
                if not spans:
                    raise ValueError(f"concept {concept!r} does not occur in prompt {prompt!r}")
                last = max((e for _, _, e in tokens), default=0)
                if not hits or any(end > last for _, end in spans):
                    raise ValueError(f"concept {concept!r} in prompt {prompt!r} falls (partly) past the "
                                     f"truncation at max_length {max_length}")
            mask[b, hits] = True
    return mask


def pipeline_max_sequence_length(pipe) -> int:
    """The T5 sequence length a pipeline uses by default (its __call__'s max_sequence_length)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if parameter is None or not isinstance(parameter.default, int):
        raise TypeError(f"{type(pipe).__name__}.__call__ has no int max_sequence_length default")
    return parameter.default


def _text_list(value, fallback, n):
    if value is None:
        return fallback
    value = _as_prompt_list(value)
    if len(value) != n:
        raise ValueError(f"prompt_2/prompt_3 must have one entry per prompt ({n}), got {len(value)}")
    return value


def mmdit_text_mask(pipe, prompts, concepts, *, prompt_2=None, prompt_3=None, max_sequence_length=None,
                    missing="raise") -> torch.Tensor:
    """[B, text_len] bool mask of the concept's columns in an MM-DiT pipeline's joint text sequence.

    SD3 (tokenizer_3 may be None: no T5, zero columns): CLIP-L (`prompts`) and CLIP-G (`prompt_2`, default the
    prompts) are concatenated along features, so both map onto the same 77 columns (their union),
    then T5's columns (`prompt_3`, default the prompts) follow: text_len = 77 + max_sequence_length.
    FLUX (a FluxTransformer2DModel pipeline): the sequence is T5's alone (`prompt_2`, default the
    prompts; CLIP is only pooled): text_len = max_sequence_length.
    max_sequence_length: default the pipeline's (SD3 256, FluxPipeline 512; pass 256 for schnell).
    Rows are batch-major like `prompts`; for a batched guidance call use `with_guidance`.
    With missing="raise", a concept must be found by at least one encoder of each prompt.
    """
    prompts = _as_prompt_list(prompts)
    if missing not in ("raise", "ignore"):
        raise ValueError(f"missing must be 'raise' or 'ignore', got {missing!r}")
    n = len(prompts)
    per_prompt = _concepts_per_prompt(concepts, n)
    family = mmdit_family(pipe)
    length = pipeline_max_sequence_length(pipe) if max_sequence_length is None else max_sequence_length
    texts = (prompts, _text_list(prompt_2, prompts, n), _text_list(prompt_3, prompts, n))
    mask = None
    for concept in dict.fromkeys(c for cs in per_prompt for c in cs):
        wanted = torch.tensor([concept in cs for cs in per_prompt])
        found = _joint_text_columns(pipe, family, texts, concept, length) & wanted[:, None]
        missed = wanted & ~found.any(1)
        if missing == "raise" and missed.any():
            b = int(missed.nonzero()[0, 0])
            raise ValueError(f"concept {concept!r} is found by none of the text encoders in prompt {prompts[b]!r} "
                             f"(misspelt, or past the truncation at {length} T5 tokens?)")
        mask = found if mask is None else mask | found
    return mask


def _joint_text_columns(pipe, family, texts, concept, length):
    """One concept's [B, text_len] columns in the family's joint text layout (see mmdit_text_mask)."""
    prompts, prompts_2, prompts_3 = texts
    if family == "flux":
        return concept_offset_mask(pipe.tokenizer_2, prompts_2, concept, max_length=length, missing="ignore")
    clip = concept_offset_mask(pipe.tokenizer, prompts, concept, max_length=pipe.tokenizer.model_max_length,
                               missing="ignore")
    clip |= concept_offset_mask(pipe.tokenizer_2, prompts_2, concept, max_length=pipe.tokenizer_2.model_max_length,
                                missing="ignore")
    if getattr(pipe, "tokenizer_3", None) is None:  # SD3 without T5: its columns are zeros the pipeline appends
        return torch.cat([clip, clip.new_zeros(len(prompts), length)], dim=1)
    t5 = concept_offset_mask(pipe.tokenizer_3, prompts_3, concept, max_length=length, missing="ignore")
    return torch.cat([clip, t5], dim=1)


def mmdit_family(pipe) -> str:
    """"sd3" or "flux" for an MM-DiT pipeline, from its components; TypeError otherwise."""
    transformer = getattr(pipe, "transformer", None)
    kind = type(transformer).__name__
    if kind == "SD3Transformer2DModel" and getattr(pipe, "tokenizer", None) is not None:
        return "sd3"  # with or without T5 (text_encoder_3=None: the pipeline appends zeros in its place)
    if kind == "FluxTransformer2DModel" and getattr(pipe, "tokenizer_2", None) is not None:
        return "flux"
    raise TypeError(f"expected a StableDiffusion3Pipeline or FluxPipeline (with its tokenizers), got "
                    f"{type(pipe).__name__} with transformer {kind}")
