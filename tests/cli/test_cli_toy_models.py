"""`--model toy` / `--model toy-mmdit`: every command taking --model reaches the built-in toy models by name
(tiny step counts: what is checked is the wiring, not the forgetting; see test_forgetting_quality*.py)."""
import json

import pytest
from PIL import Image

from fmn.cli.commands import main
from fmn.patches.patch import load_patch

FAST = ["--steps", "2", "--gen-steps", "1", "--n-images", "1", "--retain-samples", "2", "--backend", "reference",
        "-q"]


@pytest.fixture(scope="module")
def mmdit_patch(tmp_path_factory):
    out = tmp_path_factory.mktemp("patches") / "circle.safetensors"
    assert main(["forget", "--model", "toy-mmdit", "--concept", "circle", "--out", str(out), *FAST]) == 0
    return out


def test_forget_on_toy_mmdit(mmdit_patch):
    p = load_patch(mmdit_patch)
    assert p.concepts == ["circle"] and p.base_model == "fmn-toy-mmdit"
    assert all(name.startswith("transformer.") or "transformer" in name for name in p.tensors)
    assert p.options["steps"] == 2  # what was given wins over the model's defaults


def test_generate_apply_and_eval_on_toy_mmdit(mmdit_patch, tmp_path):
    grid = tmp_path / "g.png"
    assert main(["generate", "--model", "toy-mmdit", "--patch", str(mmdit_patch), "--prompt", "a red circle",
                 "--compare", "--n", "2", "--steps", "2", "--out", str(grid), "-q"]) == 0
    assert Image.open(grid).size[0] > 4 * 32
    out = tmp_path / "m.json"
    assert main(["eval", "--model", "toy-mmdit", "--patch", str(mmdit_patch), "--forget", "circle", "--seeds", "1",
                 "--steps", "2", "--out", str(out), "-q"]) == 0
    m = json.loads(out.read_text())
    assert m["model"] == "fmn-toy-mmdit" and m["base"]["n_images"] == 25 and m["patched"]["forgotten"] == ["circle"]
    assert 0 <= m["patched"]["ua"] <= 1 and "in_domain_retain_rel" in m["patched"]
    applied = tmp_path / "applied"
    assert main(["apply", "--model", "toy-mmdit", "--patch", str(mmdit_patch), "--out", str(applied), "-q"]) == 0
    index = json.loads((applied / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"


def test_a_patch_for_one_toy_model_is_refused_by_the_other(mmdit_patch, tmp_path, capsys):
    rc = main(["generate", "--model", "toy", "--patch", str(mmdit_patch), "--prompt", "a red circle", "--n", "1",
               "--steps", "1", "--out", str(tmp_path / "g.png"), "-q"])
    assert rc == 2 and "fmn: error:" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_model_toy_is_the_default_unet_model(tmp_path):
    from fmn.cli.commands import load_pipeline, model_label
    from fmn.toy import default_model_path
    named, default = load_pipeline("toy", device="cpu"), load_pipeline(None, device="cpu")
    assert type(named).__name__ == type(default).__name__ == "StableDiffusionPipeline"
    assert named.name_or_path == default.name_or_path == default_model_path()
    assert (model_label(None), model_label("toy"), model_label("toy-mmdit")) == ("fmn-toy", "fmn-toy", "fmn-toy-mmdit")
    assert model_label("./toy") == "./toy"  # a folder called toy is still reachable as a path
