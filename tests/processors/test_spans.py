"""Concept token spans on the real SD 1.x (end-of-text padding) and SD 2.x ("!" padding) tokenizers.

Expected columns are written out by hand from the prompts: every word used here is one CLIP
token (checked in test_words_are_single_tokens), so column = 1 + word index.
"""
import pytest
import torch

from fmn.processors.spans import concept_token_mask, with_guidance
from fmn.processors.tokenizer import clip_tokenizer

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


# ---- spans from character offsets (CLIP and T5) and MM-DiT joint text columns ----
from fmn.processors.spans import concept_char_spans, concept_offset_mask, mmdit_text_mask  # noqa: E402
from fmn.processors.tokenizer import t5_tokenizer  # noqa: E402

T5 = t5_tokenizer()


def marked_text(tok, prompt, mask_row, max_length):
    """The prompt characters covered by the marked tokens, joined (readable expectations)."""
    offsets = tok(prompt, padding="max_length", truncation=True, max_length=max_length,
                  return_offsets_mapping=True).offset_mapping
    return "".join(prompt[s:e] for i, (s, e) in enumerate(offsets) if mask_row[i]).replace(" ", "")


def test_char_spans_are_case_insensitive_and_word_bounded():
    text = "Van Gogh, van  gogh; VanGogh van goghs (Van Gogh)"
    assert concept_char_spans(text, "van gogh") == [(0, 8), (10, 19), (40, 48)]
    assert concept_char_spans("a cat and a catalogue", "cat") == [(2, 5)]
    with pytest.raises(ValueError, match="is empty"):
        concept_char_spans("a cat", "  ")


def test_t5_token_ids_do_not_match_but_offsets_do():
    prompt = "A painting (Van Gogh) of starry night"
    ids = T5(prompt, add_special_tokens=False).input_ids
    phrase = T5("Van Gogh", add_special_tokens=False).input_ids
    assert not any(ids[i:i + len(phrase)] == phrase for i in range(len(ids)))  # "▁ V an" vs "( V an"
    mask = concept_offset_mask(T5, [prompt], ["Van Gogh"], max_length=40)
    assert mask.shape == (1, 40)
    assert marked_text(T5, prompt, mask[0], 40) == "VanGogh"
    assert not mask[0, T5(prompt, padding="max_length", max_length=40).input_ids.index(1):].any()  # </s>, <pad>


@TOKENIZERS
def test_offset_mask_agrees_with_token_id_mask_on_clip(tok):
    prompts = ["a painting of a dog in the style of van gogh", "van gogh and a cat, van gogh."]
    assert torch.equal(concept_offset_mask(tok, prompts, ["Van Gogh"], max_length=77),
                       concept_token_mask(tok, prompts, ["van gogh"]))


def test_offset_mask_missing_and_truncation():
    with pytest.raises(ValueError, match="does not occur"):
        concept_offset_mask(T5, ["a photo of a cat"], ["dog"], max_length=32)
    with pytest.raises(ValueError, match="past the truncation at max_length 6"):
        concept_offset_mask(T5, ["a photo of a red cat"], ["cat"], max_length=6)
    assert not concept_offset_mask(T5, ["a photo of a cat"], ["dog"], max_length=32, missing="ignore").any()
    with pytest.raises(ValueError, match="max_length must be an int"):
        concept_offset_mask(T5, ["a cat"], ["cat"], max_length=1)


@pytest.fixture(scope="module")
def mmdit_pipes():
    from fmn.testing import tiny_flux_pipeline, tiny_sd3_pipeline
    return {"sd3": tiny_sd3_pipeline(), "flux": tiny_flux_pipeline()}


def test_sd3_layout_clip_columns_then_t5_columns(mmdit_pipes):
    pipe = mmdit_pipes["sd3"]
    prompts = ["a dog by Van Gogh", "a photo of a cat"]
    mask = mmdit_text_mask(pipe, prompts, ["van gogh"], max_sequence_length=24, missing="ignore")
    assert mask.shape == (2, 77 + 24)
    assert torch.equal(mask[:, :77], concept_offset_mask(pipe.tokenizer, prompts, "van gogh", max_length=77,
                                                         missing="ignore"))
    assert marked_text(pipe.tokenizer_3, prompts[0], mask[0, 77:], 24) == "VanGogh"
    assert not mask[1].any()
    assert mmdit_text_mask(pipe, prompts[:1], "dog").shape == (1, 77 + 256)  # the pipeline's default, not 512


def test_sd3_prompt_2_and_3_add_their_own_columns(mmdit_pipes):
    pipe = mmdit_pipes["sd3"]
    mask = mmdit_text_mask(pipe, ["a dog"], "cat", prompt_2=["a cat"], prompt_3=["the cat sat"],
                           max_sequence_length=16)
    assert columns(mask[0, :77]) == [2]  # CLIP-G's "cat" is column 2 of the shared 77
    assert marked_text(pipe.tokenizer_3, "the cat sat", mask[0, 77:], 16) == "cat"


def test_flux_layout_is_t5_only_and_per_prompt_concepts(mmdit_pipes):
    pipe = mmdit_pipes["flux"]
    prompts = ["a cat and a dog", "a dog and a cat"]
    mask = mmdit_text_mask(pipe, prompts, [["cat"], ["dog"]], max_sequence_length=20)
    assert mask.shape == (2, 20)
    assert marked_text(pipe.tokenizer_2, prompts[0], mask[0], 20) == "cat"
    assert marked_text(pipe.tokenizer_2, prompts[1], mask[1], 20) == "dog"
    assert mmdit_text_mask(pipe, ["a cat"], "cat").shape == (1, 512)  # FluxPipeline's default
    with pytest.raises(ValueError, match="found by none of the text encoders"):
        mmdit_text_mask(pipe, prompts, "horse")
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline or FluxPipeline"):
        mmdit_text_mask(object(), prompts, "cat")
