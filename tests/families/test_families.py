"""The model-family seam: family_for picks the UNet family for SD 1.x/2.x/XL and refuses others;
UNetFamily's noise, target and x0 formulas agree with the DDPM algebra for every prediction type;
a family that leaves a question unanswered cannot be constructed."""
import pytest
import torch

from fmn.families import FAMILIES, ModelFamily, UNetFamily, family_for
from fmn.families.base import Prompts
from fmn.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_pipeline("sd1")


def test_family_for_picks_the_unet_family_and_refuses_other_pipelines(sd1):
    assert UNetFamily in FAMILIES
    family = family_for(sd1)
    assert isinstance(family, UNetFamily) and family.denoiser is sd1.unet and family.component == "unet"
    with pytest.raises(ValueError, match="has no UNet"):
        family_for(object())


def test_a_family_must_answer_every_question():
    class Partial(ModelFamily):
        name, component, train_sets = "partial", "unet", ("attn2",)

        @classmethod
        def matches(cls, pipe):
            return True

    with pytest.raises(TypeError, match="abstract"):
        Partial(None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_target_and_x0_estimate_follow_the_ddpm_algebra(sd1, prediction_type):
    family = family_for(sd1)
    sd1.scheduler.register_to_config(prediction_type=prediction_type)
    try:
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        t = torch.tensor([0, 500, family.timestep_count() - 1])
        a = sd1.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        x_t = family.add_noise(x0, noise, t)
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
        # a perfect prediction of the target gives back x0
        target = family.target(x0, noise, t)
        expected = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}
        torch.testing.assert_close(target, expected[prediction_type])
        torch.testing.assert_close(family.x0_estimate(x_t, target, t), x0, rtol=1e-3, atol=2e-3)
    finally:
        sd1.scheduler.register_to_config(prediction_type="epsilon")


def test_prompts_columns_and_prediction(sd1):
    family = family_for(sd1)
    prompts = ["a photo of cat", "a red dog"]
    columns = family.concept_columns(prompts, ["cat", "red dog"])
    assert columns.shape == (2, sd1.tokenizer.model_max_length) and columns.sum(1).tolist() == [1, 2]
    with pytest.raises(ValueError, match="does not occur"):
        family.concept_columns(["a photo of a dog"], ["cat"])
    embeds, pooled = family.encode_prompts(prompts)
    text = Prompts(embeds, pooled, [0, 1], columns, resolution=family.default_resolution())
    assert [r.tolist() for r in text.by_concept] == [[0], [1]]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = family.predict(sd1.unet, x, torch.tensor([10, 900]), text, torch.tensor([1, 0]))
        direct = sd1.unet(x, torch.tensor([10, 900]), encoder_hidden_states=embeds[[1, 0]]).sample
    torch.testing.assert_close(out, direct)


def test_trainable_sets(sd1):
    family = family_for(sd1)
    names = {train: [n for n, _ in family.trainable(train)] for train in ("attn2", "attn2-kv", "unet")}
    assert names["attn2"] and all(".attn2." in n for n in names["attn2"])
    assert set(names["attn2-kv"]) < set(names["attn2"]) < set(names["unet"])
    assert all(any(t in n for n in names["attn2"]) for t in family.lora_targets())
    assert [n for n, _ in family.attention_layers()] and family.train_sets[-1] == "lora"


def test_default_options_are_the_toy_models_only_on_the_built_in_toy_model(sd1):
    from fmn.toy import load_default_pipeline
    from fmn.toy.defaults import forget_defaults
    assert UNetFamily(sd1).default_options(["cat"]) == {}  # any other UNet: the paper's defaults
    family = UNetFamily(load_default_pipeline())
    assert family.is_builtin_toy()
    assert family.default_options(["circle"]) == forget_defaults(["circle"])
    assert family.default_options("red", {"anchor": []}) == forget_defaults("red", anchor=False)
    assert "lr" not in family.default_options(["circle"], {"train": "lora"})  # LoRA keeps its own lr
