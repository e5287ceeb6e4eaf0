"""fmn.toy.robustness: probe images, textual inversion of one token, the Memorization Score and the
inversion attack, at small budgets (the figures at full budget are in bench/results/robustness_toy_cpu.json)."""
import pytest
import torch

from fmn.toy import load_classifier, load_default_pipeline
from fmn.toy.robustness import (TOKEN, attack, embedding_similarity, invert, memorization_score, probe_images,
                                shown_rate, with_token)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return load_default_pipeline()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _word_vector(pipe, word):
    tok = pipe.tokenizer
    return pipe.text_encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(word + "</w>")].detach()


@pytest.mark.parametrize("concept", ["heart", "blue"])
def test_probe_images_show_the_concept_in_every_value_of_the_other_attribute(concept, classifier):
    pix, which = probe_images(concept, n=10)
    pred = classifier.classify(pix)
    key, names = ("shape", ["circle", "square", "triangle", "star", "heart"]) if concept == "heart" else \
        ("color", ["red", "green", "blue", "yellow", "purple"])
    assert (pred[key] == names.index(concept)).all()
    assert sorted(set(which)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="concept must be one of"):
        probe_images("hexagon")


def test_a_token_with_the_words_embedding_is_the_word(pipe, classifier):
    """The score's two ends: the word's own embedding has similarity 1 and draws the concept as the word
    does; a random direction scores far lower."""
    tpipe = with_token(pipe, _word_vector(pipe, "heart"))
    assert embedding_similarity(tpipe, "heart") == pytest.approx(1.0, abs=1e-5)
    assert shown_rate(tpipe, "heart", classifier, seeds=(0,), num_inference_steps=10) >= 0.8
    g = torch.Generator().manual_seed(3)
    assert embedding_similarity(with_token(pipe, torch.randn(64, generator=g)), "heart") < 0.8
    assert TOKEN not in pipe.tokenizer.get_vocab()  # the copy got the token, not the pipeline


def test_inversion_trains_only_the_new_token_and_lowers_the_loss(pipe):
    unet_before = {n: (p.detach().clone(), p.requires_grad) for n, p in pipe.unet.named_parameters()}
    table_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    start = invert(pipe, "square", steps=0)["vector"]
    inv = invert(pipe, "square", steps=40, lr=2e-2)
    assert len(inv["losses"]) == 40 and not torch.equal(inv["vector"], start)
    first, last = sum(inv["losses"][:10]) / 10, sum(inv["losses"][-10:]) / 10
    assert last < first, (first, last)
    new_table = inv["pipe"].text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(new_table[:-1], table_before, rtol=0, atol=0)  # the vocabulary is untouched
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight, table_before, rtol=0, atol=0)
    for n, p in pipe.unet.named_parameters():
        assert torch.equal(p, unet_before[n][0]) and p.requires_grad == unet_before[n][1], n  # flags restored
    with pytest.raises(ValueError, match="steps"):
        invert(pipe, "square", steps=-1)


def test_memorization_score_is_zero_change_between_a_model_and_itself(pipe):
    ms = memorization_score(pipe, pipe, "star", steps=5)
    assert ms["change"] == pytest.approx(0.0, abs=1e-6) and -1 <= ms["base"] <= 1


def test_attack_reports_a_rate_over_its_images(pipe, classifier):
    res = attack(pipe, "circle", classifier, steps=5, seeds=(0,))
    assert res["n_images"] == 5 and res["steps"] == 5 and res["success"] in {i / 5 for i in range(6)}


def test_a_defence_at_generation_wraps_the_attacks_own_pipeline(pipe, classifier):
    """drawing_in gets the token-bearing pipeline, and drawing under fmn.suppress of that pipeline uses the
    token (a suppress on the base pipeline would draw with an encoder that lacks it)."""
    import fmn
    seen = []

    def drawing_in(p):
        seen.append(p)
        return fmn.suppress(p, ["circle"])
    with pytest.warns(UserWarning):  # suppress says no prompt held "circle": the token is not the word
        res = attack(pipe, "circle", classifier, steps=2, seeds=(0,), drawing_in=drawing_in)
    assert seen == [res["pipe"]] and TOKEN in seen[0].tokenizer.get_vocab()
    tpipe = with_token(pipe, _word_vector(pipe, "heart"))
    with pytest.warns(UserWarning), fmn.suppress(tpipe, ["circle"]):
        assert shown_rate(tpipe, "heart", classifier, seeds=(0,), num_inference_steps=10) >= 0.8
