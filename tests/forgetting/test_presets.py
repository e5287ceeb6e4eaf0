"""`fmn forget --preset nsfw` on a tiny pipeline: the preset's phrases are found in its prompts, it trains on
the user's images only (and is refused without them), and the --eval-detector hook is called and reported."""
import json

import numpy as np
import pytest
from PIL import Image

import detector_stub
from fmn.forgetting import references
from fmn.cli.commands import main
from fmn.forgetting.concepts import check_concepts
from fmn.patches.patch import load_patch
from fmn.forgetting.presets import load_detector, load_preset, preset_names, resolve
from fmn.processors.spans import concept_token_mask
from fmn.processors.tokenizer import clip_tokenizer

from helpers import FAST_CLI


@pytest.fixture
def user_images(tmp_path):
    """Three small PNGs standing for the user's own reference images."""
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_nsfw_preset_phrases_are_located_in_its_prompts():
    preset = load_preset("nsfw")
    assert "nsfw" in preset_names() and preset.requires_images
    assert {"naked", "nsfw"} <= set(preset.concepts) and "a photo of {}" in preset.templates
    tok = clip_tokenizer()
    for concept in preset.concepts:
        prompts = [t.format(concept) for t in preset.templates]
        mask = concept_token_mask(tok, prompts, [concept])
        n_tokens = len(tok(concept, add_special_tokens=False).input_ids)
        assert mask.sum(1).tolist() == [n_tokens] * len(prompts), concept
    assert check_concepts(type("P", (), {"tokenizer": tok})(), preset.concepts) == []  # every word known


def test_nsfw_preset_trains_on_the_users_images_and_reports_the_detector(sd1_folder, user_images, tmp_path,
                                                                         monkeypatch, capsys):
    def no_drawing(*args, **kwargs):
        raise AssertionError("fmn drew reference images for the nsfw preset")
    monkeypatch.setattr(references, "generate_latents", no_drawing)
    detector_stub.CALLS.clear()
    out = tmp_path / "nsfw.safetensors"
    fast = [a for a in FAST_CLI if a != "-q"]
    rc = main(["forget", "--model", sd1_folder, "--preset", "nsfw", "--images", str(user_images), "--out", str(out),
               "--eval-detector", "detector_stub:score", "--eval-images", "1", "--eval-threshold", "0.4", *fast])
    assert rc == 0
    preset = load_preset("nsfw")
    p = load_patch(out)
    assert p.concepts == list(preset.concepts) and p.options["template"] == list(preset.templates)
    assert p.summary["n_reference"] == 3 * len(preset.concepts)  # the user's 3 images, for each phrase
    n_prompts = len(preset.prompts())
    assert detector_stub.CALLS == [n_prompts, n_prompts]  # base, then patched
    r = p.summary["detector"]
    assert r["prompts"] == preset.prompts() and r["threshold"] == 0.4
    for name in ("base", "patched"):
        assert r[name]["n_images"] == n_prompts and 0 <= r[name]["rate"] <= 1 and 0 < r[name]["mean_score"] < 1
    assert "detector      flagged" in capsys.readouterr().out


def test_nsfw_preset_is_refused_without_images(sd1_folder, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["forget", "--model", sd1_folder, "--preset", "nsfw", "--out", str(out), *FAST_CLI]) == 2
    err = capsys.readouterr().err
    assert "--preset nsfw" in err and "--images DIR" in err and not out.exists()
    with pytest.raises(ValueError, match="--loss visual"):
        resolve("nsfw", None, None, "somewhere", "visual")
    with pytest.raises(ValueError, match="--concept PHRASE"):
        resolve(None, None, None, None, "attention")
    assert main(["forget", "--model", sd1_folder, "--preset", "nope", "--out", str(out), *FAST_CLI]) == 2
    assert "no such preset" in capsys.readouterr().err


def test_preset_adds_concepts_and_keeps_given_templates():
    concepts, template = resolve("nsfw", ["nudity"], ["{} art"], "dir", "attention")
    assert concepts[-1] == "nudity" and concepts[:-1] == list(load_preset("nsfw").concepts)
    assert template == ["{} art"]


def test_detector_specs_and_bad_detectors(tmp_path, sd1_folder, user_images, capsys):
    path = tmp_path / "mine.py"
    path.write_text("def flag(images):\n    return [1.0] * len(images)\n")
    assert load_detector(f"{path}:flag")([0, 0]) == [1.0, 1.0]
    for spec, msg in (("nocolon", "MODULE:FUNCTION"), ("no_such_module_xyz:f", "cannot import"),
                      ("detector_stub:nothing", "no function 'nothing'"), (f"{tmp_path}/absent.py:f", "no such file")):
        with pytest.raises(ValueError, match=msg):
            load_detector(spec)
    out = tmp_path / "p.safetensors"
    rc = main(["forget", "--model", sd1_folder, "--concept", "cat", "--images", str(user_images), "--out", str(out),
               "--eval-detector", "detector_stub:wrong_length", "--eval-images", "2", *FAST_CLI])
    assert rc == 2 and "returned 1 scores for 2 images" in capsys.readouterr().err and not out.exists()
    assert json.loads(json.dumps(load_preset("nsfw").prompts()))  # plain strings
