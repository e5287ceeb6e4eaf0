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
