"""Concept token spans on the real SD 1.x (end-of-text padding) and SD 2.x ("!" padding) tokenizers.

Expected columns are written out by hand from the prompts: every word used here is one CLIP
token (checked in test_words_are_single_tokens), so column = 1 + word index.
"""
import pytest
import torch

from fmn.spans import concept_token_mask, with_guidance
from fmn.tokenizer import clip_tokenizer

SD1 = clip_tokenizer()
SD2 = clip_tokenizer(pad_token="!")
TOKENIZERS = pytest.mark.parametrize("tok", [SD1, SD2], ids=["sd1", "sd2"])


def columns(row):
    return torch.nonzero(row).flatten().tolist()


def test_words_are_single_tokens():
    for word in ["a", "photo", "of", "cat", "dog", "and", "painting", "in", "the", "style", "van", "gogh"]:
        assert len(SD1(word, add_special_tokens=False).input_ids) == 1, word
    assert SD1.pad_token_id == SD1.eos_token_id == 49407 and SD2.pad_token_id == 0


@TOKENIZERS
def test_concept_at_end_with_and_without_punctuation(tok):
    mask = concept_token_mask(tok, ["a photo of a cat", "a photo of a cat."], ["cat"])
    assert mask.shape == (2, 77) and mask.dtype == torch.bool
    assert columns(mask[0]) == [5] and columns(mask[1]) == [5]


@TOKENIZERS
def test_repeated_concept_marks_every_occurrence(tok):
    mask = concept_token_mask(tok, ["cat cat, a cat"], ["cat"])
    assert columns(mask[0]) == [1, 2, 5]  # "," is token 3


@TOKENIZERS
def test_multi_word_concept_is_case_insensitive(tok):
    mask = concept_token_mask(tok, ["a painting in the style of Van Gogh"], ["van gogh"])
    assert columns(mask[0]) == [7, 8]


@TOKENIZERS
def test_several_concepts_and_per_sample_positions(tok):
    # Every phrase is searched in every prompt (and must occur in each).
    prompts = ["a cat and a dog", "dog cat", "a photo of a dog and a cat"]
    mask = concept_token_mask(tok, prompts, ["cat", "dog"])
    assert [columns(r) for r in mask] == [[2, 5], [1, 2], [5, 8]]


def test_concepts_given_per_prompt():
    mask = concept_token_mask(SD1, ["a cat and a dog", "a dog and a cat"], [["cat"], ["dog", "cat"]])
    assert [columns(r) for r in mask] == [[2], [2, 5]]


@TOKENIZERS
def test_absent_concept_names_concept_and_prompt(tok):
    with pytest.raises(ValueError, match=r"'dog'.*'a photo of a cat'"):
        concept_token_mask(tok, ["a photo of a cat"], ["dog"])
    # Token ids must match, not characters: "cat" is not inside "cats" or "caterpillar".
    for prompt in ["a photo of cats", "a caterpillar"]:
        with pytest.raises(ValueError, match="'cat'"):
            concept_token_mask(tok, [prompt], ["cat"])


def test_missing_ignore_marks_nothing():
    mask = concept_token_mask(SD1, ["a dog", "a cat"], ["cat"], missing="ignore")
    assert [columns(r) for r in mask] == [[], [2]]


@TOKENIZERS
def test_concept_truncated_away_is_an_error(tok):
    prompt = " ".join(["dog"] * 80) + " cat"
    with pytest.raises(ValueError, match="truncation"):
        concept_token_mask(tok, [prompt], ["cat"])


def test_padding_never_matches():
    # SD 2.x pads with "!" (id 0); a "!" concept must not match the padding.
    with pytest.raises(ValueError, match="'!'"):
        concept_token_mask(SD2, ["a photo of a cat"], ["!"])


def test_include_eos_sd1_marks_padding_sd2_only_the_real_eos():
    # "a photo of a cat": end-of-text at column 6.
    sd1 = concept_token_mask(SD1, ["a photo of a cat"], ["cat"], include_eos=True)
    sd2 = concept_token_mask(SD2, ["a photo of a cat"], ["cat"], include_eos=True)
    assert columns(sd1[0]) == [5] + list(range(6, 77))
    assert columns(sd2[0]) == [5, 6]


def test_max_length():
    mask = concept_token_mask(SD1, ["a photo of a cat"], ["cat"], max_length=10)
    assert mask.shape == (1, 10) and columns(mask[0]) == [5]


def test_with_guidance_gives_unconditional_half_no_columns():
    mask = concept_token_mask(SD1, ["a cat", "a dog"], [["cat"], ["dog"]])
    full = with_guidance(mask)
    assert full.shape == (4, 77)
    assert not full[:2].any() and torch.equal(full[2:], mask)


def test_bad_inputs():
    with pytest.raises(TypeError, match="prompts"):
        concept_token_mask(SD1, [], ["cat"])
    with pytest.raises(TypeError, match="concepts"):
        concept_token_mask(SD1, ["a cat"], [])
    with pytest.raises(ValueError, match="one list per prompt"):
        concept_token_mask(SD1, ["a cat", "a cat"], [["cat"]])
    with pytest.raises(ValueError, match="no tokens"):
        concept_token_mask(SD1, ["a cat"], [" "])
    with pytest.raises(TypeError, match="mask"):
        with_guidance(torch.zeros(77, dtype=torch.bool))


def test_small_vocabulary_splits_its_words_as_clip_does():
    """The toy model's tokenizer: CLIP's BPE kept only for the captions' words."""
    from fmn.toy.data import all_captions, vocabulary
    small = clip_tokenizer(words=vocabulary(), model_max_length=8)
    assert len(small) < 600 and small.model_max_length == 8
    for cap in all_captions():
        assert small.tokenize(cap) == SD1.tokenize(cap), cap
    # a word outside the captions still tokenizes, into smaller pieces
    assert len(small.tokenize("dragon")) > len(SD1.tokenize("dragon")) == 1
    assert small.convert_tokens_to_ids("<|endoftext|>") == len(small) - 1
    with pytest.raises(ValueError, match="words"):
        clip_tokenizer(words=[" "])
