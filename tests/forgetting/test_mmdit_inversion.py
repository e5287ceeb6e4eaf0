"""Concept inversion on SD3 / FLUX pipelines: textual inversion trains only the new tokens' input
embeddings, in every text encoder (T5 included), on copies; the pipeline's own tokenizers and encoders are
never touched (also after an exception); fmn.forget(inversion=True) and the robustness report (Memorization
Score, inversion attack) run on tiny SD3 / FLUX and on the built-in toy-mmdit."""
import contextlib
import json
import math

import pytest
import torch

import fmn
from fmn.cli.commands import main as cli
from fmn.families.mmdit import MMDiTFamily
from fmn.forgetting.inversion import invert
from fmn.forgetting.options import ForgetOptions
from fmn.testing import tiny_flux_pipeline, tiny_sd3_pipeline

BUILD = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
TEMPLATES = ["a painting by {}"]


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request):
    return BUILD[request.param]()


def text_state(family):
    """The pipeline's tokenizers (object, length) and encoders (object, weights)."""
    return [(tok, len(tok), enc, {k: v.clone() for k, v in enc.state_dict().items()})
            for tok, enc in family.text_parts()]


def assert_text_untouched(family, before):
    for (tok, n, enc, weights), (tok_now, enc_now) in zip(before, family.text_parts(), strict=True):
        assert tok_now is tok and enc_now is enc and len(tok_now) == n
        assert all(torch.equal(weights[k], v) for k, v in enc_now.state_dict().items())


def run_inversion(family, steps):
    opts = ForgetOptions(inversion=True, inversion_steps=steps, inversion_tokens=2, inversion_lr=5e-2, seed=0,
                         batch_size=2, resolution=64, progress=False)
    items = [(0, x) for x in torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))]
    return invert(family, ["Van Gogh"], items, TEMPLATES, opts, torch.device("cpu"), contextlib.nullcontext)


def test_inversion_changes_only_the_new_tokens_in_every_encoder(pipe):
    family = MMDiTFamily(pipe, max_sequence_length=24)
    before = text_state(family)
    start, _ = run_inversion(family, 0)
    parts, words = run_inversion(family, 3)
    assert words == ["<fmn-c0-0> <fmn-c0-1>"]
    assert_text_untouched(family, before)
    assert len(parts) == len(before) == (3 if family.kind == "sd3" else 2)  # T5 included
    for (_, enc0), (tok, enc), (_, n, own, _) in zip(start, parts, before):
        assert len(tok) == n + 2 and tok is not before[0][0]
        ids = tok(words[0], add_special_tokens=False).input_ids
        new = tok.convert_tokens_to_ids(words[0].split())
        assert new == [n, n + 1] and all(i in ids for i in new)  # each new token is one piece, T5's too
        emb, emb0 = enc.get_input_embeddings().weight, enc0.get_input_embeddings().weight
        torch.testing.assert_close(emb[:n], own.get_input_embeddings().weight, rtol=0, atol=0)
        assert not torch.equal(emb[n:], emb0[n:]), "the new tokens did not learn"
        others = [k for k in enc.state_dict() if "embed_tokens" not in k and "token_embedding" not in k
                  and k != "shared.weight"]
        assert all(torch.equal(enc.state_dict()[k], own.state_dict()[k]) for k in others)


def test_encoding_with_copies_reads_the_new_tokens_and_puts_the_originals_back(pipe):
    family = MMDiTFamily(pipe, max_sequence_length=24)
    before = text_state(family)
    parts, words = run_inversion(family, 0)
    prompt = [TEMPLATES[0].format(words[0])]
    embeds, pooled = family.encode_prompts(prompt, parts)
    columns = family.concept_columns(prompt, words, parts=parts)
    assert embeds.shape[1] == columns.shape[1] and columns.any()
    assert_text_untouched(family, before)
    # the pipeline's own tokenizers split each new token into several pieces: more columns
    assert columns.sum() < family.concept_columns(prompt, words).sum()
    assert not torch.allclose(embeds, family.encode_prompts(prompt)[0])
    with pytest.raises(RuntimeError, match="inside"):
        with family.using_text_parts(parts):
            assert family.text_parts()[0][0] is parts[0][0]
            raise RuntimeError("inside")
    assert_text_untouched(family, before)
    with pytest.raises(ValueError, match="parts"):
        family.encode_prompts(prompt, parts[:1])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_forget_with_inversion_runs_and_leaves_the_text_encoders_alone(kind):
    pipe = BUILD[kind]()
    family = MMDiTFamily(pipe)
    before = text_state(family)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    patch = fmn.forget(pipe, "Van Gogh", latents, steps=2, lr=1e-3, resolution=64, template=TEMPLATES,
                       backend="reference", progress=False, inversion=True, inversion_steps=2, inversion_tokens=2)
    assert patch.summary["inverted_tokens"] == ["<fmn-c0-0> <fmn-c0-1>"] and patch.tensors
    assert all(k.startswith("transformer.") for k in patch.tensors)
    assert_text_untouched(family, before)


def test_robustness_on_toy_mmdit_gives_finite_figures(tmp_path):
    """fmn eval --robustness on toy-mmdit at a tiny budget: finite Memorization Scores, rates in [0, 1]."""
    from fmn.toy import load_pipeline
    patch = tmp_path / "circle.safetensors"  # the reference backend: the tests run Triton's interpreter
    fmn.forget(load_pipeline("toy-mmdit"), "circle", steps=2, n_images=2, gen_steps=2, retain_samples=4,
               backend="reference", progress=False).save(patch)
    out = tmp_path / "r.json"
    assert cli(["eval", "--model", "toy-mmdit", "--patch", str(patch), "--forget", "circle", "--seeds", "1",
                "--steps", "3", "--robustness", "--inversion-steps", "2", "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())["robustness"]["circle"]
    ms = r["memorization_score"]
    assert all(math.isfinite(ms[k]) and -1 <= ms[k] <= 1 for k in ("base", "patched"))
    assert ms["change"] == pytest.approx(ms["patched"] - ms["base"])
    assert r["inversion_steps"] == 2 and 0 <= r["attack_success"] <= 1 and 0 <= r["attack_success_on_base"] <= 1


def test_toy_mmdit_inversion_learns_one_token_per_text_encoder():
    from fmn.toy import load_pipeline
    from fmn.toy.robustness import invert as invert_probe
    pipe = load_pipeline("toy-mmdit")
    tables = [pipe.text_encoder.get_input_embeddings().weight.clone(),
              pipe.text_encoder_2.get_input_embeddings().weight.clone()]
    start = invert_probe(pipe, "square", steps=0)["vectors"]
    inv = invert_probe(pipe, "square", steps=3)
    assert len(inv["vectors"]) == 2 and all(not torch.equal(a, b) for a, b in zip(inv["vectors"], start))
    for name, table in zip(("text_encoder", "text_encoder_2"), tables):
        new = getattr(inv["pipe"], name).get_input_embeddings().weight
        torch.testing.assert_close(new[:-1], table, rtol=0, atol=0)
        torch.testing.assert_close(getattr(pipe, name).get_input_embeddings().weight, table, rtol=0, atol=0)
    assert all(math.isfinite(x) for x in inv["losses"])
