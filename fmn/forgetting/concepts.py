"""Checks of concept phrases against a pipeline's tokenizer, before any training.

A word the tokenizer's vocabulary does not hold as one token is split into pieces (the built-in
toy model's small vocabulary splits "xq" into "x", "q"; byte-level BPE splits an emoji it does not
know into bytes): the text encoder has most likely never seen the word, so forgetting it removes
nothing the model draws. That is reported (a warning; `fmn forget --strict` makes it an error).
A phrase longer than the tokenizer's window cannot be marked at all: a ValueError.
"""
from __future__ import annotations


def _pieces(tokenizer, word) -> list[str]:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


def check_concepts(pipe, concepts) -> list[str]:
    """Messages for every concept word the tokenizer does not know; ValueError for a concept that
    cannot be encoded within the tokenizer's window or encodes to nothing."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return []
    window = getattr(tokenizer, "model_max_length", 77) - 2  # start and end of text
    messages = []
    for concept in concepts:
        pieces = _pieces(tokenizer, concept)
        if not pieces:
            raise ValueError(f"concept {concept!r}: the tokenizer encodes it as nothing (no words?)")
        if len(pieces) > window:
            raise ValueError(f"concept {concept!r} takes {len(pieces)} tokens; the model reads at most {window} "
                             f"(pieces: {' '.join(pieces[:8])}{' ...' if len(pieces) > 8 else ''})")
        for word in concept.split():
            parts = _pieces(tokenizer, word)
            if len(parts) > 1:
                kind = ("text the tokenizer has no word for" if not word.isascii()
                        else "a word the tokenizer does not know")
                messages.append(f"concept {concept!r}: {word!r} is {kind}: the tokenizer splits it into "
                                f"{len(parts)} pieces ({' '.join(parts)}); the model has most likely never seen it, "
                                "so there may be nothing to forget")
    return messages
