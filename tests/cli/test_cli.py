"""The fmn command line end to end on a tiny pipeline folder, and its refusals of bad input."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fmn.families import UNetFamily
from fmn.cli.commands import main
from fmn.cli.grid import cell, layout
from fmn.patches.patch import load_patch
from fmn.testing import save_tiny_pipeline

from helpers import FAST_CLI, interrupt_on_call

# sd1_folder (a tiny SD 1.x pipeline folder) and cat_patch (`fmn forget --concept cat` on it): tests/conftest.py


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd1-seed1"
    save_tiny_pipeline(path, "sd1", seed=1)
    return str(path)


def files(folder):
    return sorted(os.listdir(folder))


def test_forget_writes_a_patch(cat_patch, sd1_folder):
    p = load_patch(cat_patch)
    assert p.concepts == ["cat"] and p.kind == "delta" and p.base_model == sd1_folder
    assert p.options["steps"] == 2 and p.summary["steps"] == 2
    assert files(cat_patch.parent) == ["cat.safetensors"]  # no temp files left


def test_forget_options_reach_the_run(sd1_folder, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    rc = main(["forget", "--model", sd1_folder, "--concept", "cat", "--concept", "dog", "--out", str(out),
               "--steps", "3", "--lr", "1e-3", "--seed", "5", "--resolution", "24", "--batch-size", "2",
               "--train", "lora", "--loss", "both", "--precision", "bf16", "--patch-dtype", "bf16",
               "--template", "a photo of {}", "--template", "{} in a field", "--gen-steps", "1", "--n-images", "1",
               "--backend", "reference"])
    assert rc == 0
    p = load_patch(out)
    o = p.options
    assert (o["steps"], o["lr"], o["seed"], o["resolution"], o["batch_size"], o["train"], o["loss"], o["precision"],
            o["patch_dtype"], o["template"]) == (3, 1e-3, 5, 24, 2, "lora", "both", "bf16", "bf16",
                                                 ["a photo of {}", "{} in a field"])
    assert p.kind == "lora" and p.concepts == ["cat", "dog"]
    assert all(t.dtype == torch.bfloat16 for t in p.tensors.values())
    printed = capsys.readouterr().out
    assert "loss" in printed and "patch" in printed and "peak memory" in printed


def test_apply_saves_a_patched_pipeline(sd1_folder, cat_patch, tmp_path):
    out = tmp_path / "patched"
    assert main(["apply", "--model", sd1_folder, "--patch", str(cat_patch), "--out", str(out), "-q"]) == 0
    from diffusers import StableDiffusionPipeline
    base = StableDiffusionPipeline.from_pretrained(sd1_folder)
    patched = StableDiffusionPipeline.from_pretrained(str(out))
    p = load_patch(cat_patch)
    for name, delta in p.tensors.items():
        w0 = base.unet.get_parameter(name[5:])
        w1 = patched.unet.get_parameter(name[5:])
        torch.testing.assert_close(w1, w0 + delta.float(), rtol=0, atol=1e-6)
    # the patched model is not the base any more: applying again is refused, nothing written
    again = tmp_path / "again"
    assert main(["apply", "--model", str(out), "--patch", str(cat_patch), "--out", str(again), "-q"]) == 2
    assert not again.exists()
    assert files(tmp_path) == ["patched"]


def test_generate_grid_and_compare(sd1_folder, cat_patch, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", sd1_folder, "--patch", str(cat_patch), "--prompt", "a photo of cat",
                 "--prompt", "a dog", "--n", "2", "--steps", "2", "--compare", "--out", str(out), "-q"]) == 0
    im = Image.open(out)
    prompts, cols = ["a photo of cat", "a dog"], ["base s0", "base s1", "patched s0", "patched s1"]
    lay = layout((16, 16), prompts, cols)  # 2 prompts x (2 base + 2 patched), 16 px images, labelled
    assert im.size == cell(lay, 1, 3)[2:]
    for r in range(2):
        for c in range(2):
            assert im.crop(cell(lay, r, c)).tobytes() != im.crop(cell(lay, r, c + 2)).tobytes()
    assert len(set(im.crop((0, 0, lay[1], im.size[1])).getdata())) > 1  # the prompt labels are drawn
    plain = tmp_path / "plain.png"
    assert main(["generate", "--model", sd1_folder, "--prompt", "a cat", "--n", "1", "--steps", "1",
                 "--out", str(plain), "-q"]) == 0
    assert Image.open(plain).size == cell(layout((16, 16), ["a cat"], ["seed s0"]), 0, 0)[2:]


def test_forget_writes_a_before_after_grid(sd1_folder, tmp_path):
    out, grid = tmp_path / "p.safetensors", tmp_path / "grid.png"
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), "--grid", str(grid),
                 "--grid-prompt", "a photo of cat", "--grid-prompt", "a dog", "--grid-steps", "2", *FAST_CLI]) == 0
    im = Image.open(grid)
    cols = [f"base s{i}" for i in range(4)] + [f"patched s{i}" for i in range(4)]
    lay = layout((16, 16), ["a photo of cat", "a dog"], cols)  # 2 prompts x (4 base + 4 patched)
    assert im.size == cell(lay, 1, 7)[2:]
    assert im.crop(cell(lay, 0, 0)).tobytes() != im.crop(cell(lay, 0, 4)).tobytes()
    # an existing grid is refused before any training, and nothing is written
    out2 = tmp_path / "p2.safetensors"
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out2), "--grid", str(grid),
                 *FAST_CLI]) == 2
    assert not out2.exists()


def test_forget_prints_where_the_time_went(sd1_folder, tmp_path, capsys):
    """The summary ends with the wall time split into load, reference images, steps, closed form and grid."""
    out, grid = tmp_path / "p.safetensors", tmp_path / "grid.png"
    fast = [a for a in FAST_CLI if a != "-q"]
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), "--grid", str(grid),
                 "--grid-steps", "1", *fast]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time split"))
    parts = dict(re.findall(r"(load|images|steps|closed form|grid|other) ([0-9.]+) s", line))
    assert list(parts) == ["load", "images", "steps", "closed form", "grid", "other"], line
    wall = float(re.search(r"([0-9.]+) s wall", line).group(1))
    assert wall > 0 and float(parts["steps"]) > 0 and float(parts["grid"]) > 0
    assert abs(sum(map(float, parts.values())) - wall) <= 0.1, line  # rounding of the parts and the wall



@pytest.fixture(scope="module")
def builtin_circle(tmp_path_factory):
    """`fmn forget --concept circle` without --model (the shipped toy model, or a clear error), FAST_CLI:
    (exit status, stderr, patch path)."""
    out = tmp_path_factory.mktemp("builtin") / "circle.safetensors"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["forget", "--concept", "circle", "--out", str(out), *FAST_CLI])
    return rc, err.getvalue(), out


def test_eval_on_the_builtin_model(builtin_circle, tmp_path):
    rc, err, patch_path = builtin_circle
    assert rc == 0, err
    out, grid = tmp_path / "m.json", tmp_path / "g.png"
    # memorization score and inversion attack too, at a tiny budget (full budget: bench/bench_robustness.py)
    assert main(["eval", "--patch", str(patch_path), "--forget", "circle", "--seeds", "1", "--steps", "4",
                 "--robustness", "--inversion-steps", "2", "--out", str(out), "--grid", str(grid), "-q"]) == 0
    m = json.loads(out.read_text())
    assert m["base"]["n_images"] == 25 and m["patched"]["forgotten"] == ["circle"]
    for key in ("ua", "in_domain_retain", "cross_domain_retain"):
        assert 0 <= m["patched"][key] <= 1
    assert "in_domain_retain_rel" in m["patched"] and Image.open(grid).size[0] > 2 * 5 * 32
    from fmn.toy import COLORS, SHAPES
    lay = layout((32, 32), SHAPES, [f"{p} {c} s0" for p in ("base", "patched") for c in COLORS])
    assert Image.open(grid).size == cell(lay, 4, 9)[2:]  # a row per shape, base and patched colours
    assert main(["eval", "--forget", "hexagon", "--out", str(tmp_path / "x.json"), "-q"]) == 2
    assert main(["eval", "--forget", "circle", "--robustness", "--out", str(tmp_path / "x.json"), "-q"]) == 2
    r = m["robustness"]["circle"]
    assert r["inversion_steps"] == 2 and 0 <= r["attack_success"] <= 1 and 0 <= r["attack_success_on_base"] <= 1
    ms = r["memorization_score"]
    assert ms["change"] == pytest.approx(ms["patched"] - ms["base"]) and -1 <= ms["base"] <= 1


def test_info(cat_patch, capsys):
    assert main(["info", str(cat_patch), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["concepts"] == ["cat"] and info["kind"] == "delta" and info["options"]["train"] == "attn2"
    assert len(info["summary"]["losses"]) == 2 and info["fingerprint"]["tensors"]  # the whole record
    assert main(["info", str(cat_patch)]) == 0
    short = capsys.readouterr().out.splitlines()
    assert len(short) <= 8 and short[0].split() == ["concepts", "cat"] and "--json" in short[-1]


def test_python_dash_m_end_to_end(sd1_folder, tmp_path):
    out = tmp_path / "m.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fmn", "forget", "--model", sd1_folder, "--concept", "cat",
                        "--out", str(out), *FAST_CLI], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_patch(out).concepts == ["cat"]


# ----------------------------------------------------------------------------- bad input
def run_err(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_missing_or_unreadable_model(tmp_path, capsys):
    out = str(tmp_path / "p.safetensors")
    rc, err = run_err(["forget", "--model", str(tmp_path / "nope"), "--concept", "cat", "--out", out, "-q"], capsys)
    assert rc == 2 and "does not exist" in err
    (tmp_path / "notapipe").mkdir()
    rc, err = run_err(["forget", "--model", str(tmp_path / "notapipe"), "--concept", "cat", "--out", out, "-q"], capsys)
    assert rc == 2 and "model_index.json" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    rc, err = run_err(["forget", "--model", str(broken), "--concept", "cat", "--out", out, "-q"], capsys)
    assert rc == 2 and "cannot load model" in err
    assert files(tmp_path) == ["broken", "notapipe"]


def test_existing_output_needs_force(sd1_folder, cat_patch, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"precious")
    rc, err = run_err(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI], capsys)
    assert rc == 2 and "--force" in err and out.read_bytes() == b"precious"
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), "--force", *FAST_CLI]) == 0
    assert load_patch(out).concepts == ["cat"]
    grid = tmp_path / "g.png"
    grid.write_bytes(b"x")
    rc, err = run_err(["generate", "--model", sd1_folder, "--prompt", "a", "--out", str(grid), "-q"], capsys)
    assert rc == 2 and grid.read_bytes() == b"x"
    (tmp_path / "dir").mkdir()
    rc, err = run_err(["apply", "--model", sd1_folder, "--patch", str(cat_patch), "--out", str(tmp_path / "dir"), "-q"],
                      capsys)
    assert rc == 2 and "--force" in err


def test_bad_image_folders(sd1_folder, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    base = ["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI]
    rc, err = run_err(base + ["--images", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "no such folder" in err
    (tmp_path / "empty").mkdir()
    rc, err = run_err(base + ["--images", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "no images" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    rc, err = run_err(base + ["--images", str(tmp_path / "bad")], capsys)
    assert rc == 2 and "cannot read image" in err
    assert not out.exists()


def test_concept_absent_and_bad_options(sd1_folder, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    rc, err = run_err(["forget", "--model", sd1_folder, "--concept", "cat", "--template", "a photo of {}s",
                       "--out", str(out), *FAST_CLI], capsys)
    assert rc == 2 and "'cat' does not occur" in err
    rc, err = run_err(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI,
                       "--steps", "0"], capsys)
    assert rc == 2 and "steps" in err
    assert not out.exists()


def test_patch_for_another_model(other_model, cat_patch, tmp_path, capsys):
    rc, err = run_err(["apply", "--model", other_model, "--patch", str(cat_patch), "--out", str(tmp_path / "o"),
                       "-q"], capsys)
    assert rc == 2 and "does not match" in err
    rc, err = run_err(["generate", "--model", other_model, "--patch", str(cat_patch), "--prompt", "a cat",
                       "--out", str(tmp_path / "g.png"), "-q"], capsys)
    assert rc == 2 and "does not match" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    rc, err = run_err(["apply", "--model", other_model, "--patch", str(junk), "--out", str(tmp_path / "o"), "-q"],
                      capsys)
    assert rc == 2 and "cannot read patch" in err
    assert files(tmp_path) == ["junk.safetensors"]


def test_nan_loss_exits_1_and_writes_nothing(sd1_folder, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    rc, err = run_err(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI,
                       "--lr", "1e30", "--steps", "4"], capsys)
    assert rc == 1 and ("not finite" in err or "nan" in err), err
    assert files(tmp_path) == []


def test_interrupt_leaves_no_partial_patch(sd1_folder, tmp_path, capsys, monkeypatch):
    interrupt_on_call(monkeypatch, UNetFamily, "predict", 3)
    rc, err = run_err(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(tmp_path / "p.safetensors"),
                       *FAST_CLI, "--steps", "5"], capsys)
    assert rc == 130 and "interrupted" in err
    assert files(tmp_path) == []


def test_default_model_or_a_clear_error(builtin_circle, tmp_path):
    """Without --model: the shipped toy model, or (in a checkout without it) a clear error."""
    from pathlib import Path
    try:
        from fmn.toy import default_model_path
        shipped = (Path(default_model_path()) / "model_index.json").is_file()
    except ImportError:
        shipped = False
    rc, err, out = builtin_circle
    if shipped:
        patch = load_patch(out)
        assert rc == 0 and patch.concepts == ["circle"]
        # the toy model's defaults fill what the command leaves unset: the other shapes are retained, on their
        # own images (fmn.toy.defaults.ROBUST)
        assert patch.options["retain"] == ["square", "triangle", "star", "heart"]
        assert patch.options["retain_weight"] == 8.0 and patch.options["retain_images"] == 4
        assert "a red {}" in patch.options["template"]  # the toy caption forms (fmn.toy.defaults.templates_for)
        assert patch.options["anchor"] == ["square"] and patch.options["anchor_weight"] == 16.0
        assert patch.summary["anchor_losses"] is not None
        # --anchor "" turns the toy model's anchor off; --anchor sets another
        for flag, want in (("", []), ("star", ["star"])):
            out2 = tmp_path / f"p-{flag or 'none'}.safetensors"
            assert main(["forget", "--concept", "circle", "--out", str(out2), "--anchor", flag, *FAST_CLI]) == 0
            options = load_patch(out2).options
            assert options["anchor"] == want and options["anchor_weight"] == (16.0 if want else 1.0)
    else:
        assert rc == 2 and "default model" in err and "--model" in err
        assert not out.exists()


def test_forget_writes_a_low_rank_patch(sd1_folder, tmp_path):
    from fmn.cli.commands import main
    out = tmp_path / "cat-r1.safetensors"
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), "--patch-rank", "1",
                 *FAST_CLI]) == 0
    p = load_patch(out)
    assert p.summary["compression"]["rank"] == 1
    assert any(name.endswith(".delta_up") for name in p.tensors)
    for bad in (["--patch-rank", "0"], ["--patch-rel-error", "1.5"], ["--patch-rank", "2", "--patch-rel-error", "0.1"]):
        assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(tmp_path / "x.safetensors"),
                     *bad, *FAST_CLI]) == 2
    assert not (tmp_path / "x.safetensors").exists()
