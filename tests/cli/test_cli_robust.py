"""The command line as a stranger meets it: every error one line with exit status 2 (--debug: the
traceback), outputs checked before any work, nothing new or changed on failure or interrupt, bad
values refused up front, fmn info short or --json and quiet on a closed pipe, no temporary folders
left, normal permissions, unknown concept words, and fmn export."""
import os
import stat
import subprocess
import sys
import tempfile

import pytest
from safetensors import safe_open

import fmn.cli.commands as cli
from fmn.cli.commands import main

from helpers import FAST_CLI, interrupt_on_call

# sd1_folder (a tiny SD 1.x pipeline folder) and cat_patch (`fmn forget --concept cat` on it): tests/conftest.py


def one_line_error(argv, capsys, rc=2):
    got = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [e for e in err if e.startswith("fmn: error: ")]
    assert got == rc and len(errors) == 1, (got, err)
    assert "Traceback" not in "\n".join(err)
    return errors[0]


BAD_VALUES = {
    "device bogus": (["forget", "--concept", "c", "--device", "bogus"], "--device"),
    "gen-steps 0": (["forget", "--concept", "c", "--gen-steps", "0"], "--gen-steps"),
    "steps -1": (["forget", "--concept", "c", "--steps", "-1"], "--steps"),
    # 0 steps is the closed-form edit alone (on the toy models: their edit); without the closed form it is refused
    "steps 0": (["forget", "--concept", "c", "--steps", "0", "--no-closed-form"], "steps must be >= 1"),
    "steps 0, lora": (["forget", "--concept", "c", "--steps", "0", "--train", "lora"], "train='lora'"),
    "lr 0": (["forget", "--concept", "c", "--lr", "0"], "--lr"),
    "n-images not a number": (["forget", "--concept", "c", "--n-images", "many"], "--n-images"),
    "generate n 0": (["generate", "--prompt", "a", "--n", "0"], "--n"),
    "generate steps 0": (["generate", "--prompt", "a", "--steps", "0"], "--steps"),
    "eval seeds 0": (["eval", "--forget", "circle", "--seeds", "0"], "--seeds"),
    "unknown option": (["forget", "--concept", "c", "--stpes", "3"], "--stpes"),
    "no command": ([], "command"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_refused_up_front(case, tmp_path, capsys):
    argv, name = BAD_VALUES[case]
    out = tmp_path / "new" / "out.file"
    argv = argv + (["--out", str(out)] if argv else [])
    assert name in one_line_error(argv, capsys)
    assert not (tmp_path / "new").exists()


def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = one_line_error(["forget", "--concept", "c", "--device", "cuda", "--out", str(tmp_path / "p")], capsys)
    assert "CUDA is not available" in msg


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc = main(["info", str(tmp_path / "missing.safetensors"), "--debug"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fmn: error: ")


def test_outputs_are_checked_before_any_work(sd1_folder, tmp_path, capsys, monkeypatch):
    import fmn.forgetting.trainer
    monkeypatch.setattr(fmn.forgetting.trainer, "forget", lambda *a, **k: pytest.fail("trained despite a bad output"))
    (tmp_path / "adir").mkdir()
    base = ["forget", "--model", sd1_folder, "--concept", "cat", *FAST_CLI]
    assert "is a directory" in one_line_error(base + ["--out", str(tmp_path / "adir"), "--force"], capsys)
    assert "cannot write" in one_line_error(base + ["--out", "/proc/fmn-test/p.safetensors"], capsys)
    grid = tmp_path / "g.png"
    grid.write_bytes(b"keep")
    assert "exists" in one_line_error(base + ["--out", str(tmp_path / "p.safetensors"), "--grid", str(grid)], capsys)
    same = str(tmp_path / "same.png")
    assert "different" in one_line_error(base + ["--out", same, "--grid", same], capsys)
    assert sorted(os.listdir(tmp_path)) == ["adir", "g.png"] and grid.read_bytes() == b"keep"


def test_failed_run_leaves_no_parent_folder(sd1_folder, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "p.safetensors"
    one_line_error(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI, "--lr", "1e30",
                    "--steps", "4"], capsys, rc=1)
    assert os.listdir(tmp_path) == []


def test_interrupt_while_the_grid_is_drawn_writes_nothing(sd1_folder, tmp_path, capsys, monkeypatch):
    interrupt_on_call(monkeypatch, cli, "_images", 2)  # the second call draws the patched half of the grid
    rc = main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(tmp_path / "p.safetensors"),
               "--grid", str(tmp_path / "g.png"), "--grid-steps", "1", *FAST_CLI])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_commit_is_all_or_nothing(tmp_path):
    from fmn.cli.outputs import commit

    def boom(tmp):
        raise KeyboardInterrupt

    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        commit([(tmp_path / "sub" / "a.txt", lambda t: open(t, "w").write("a"), False),
                (tmp_path / "old.txt", boom, False)], force=True)
    assert os.listdir(tmp_path) == ["old.txt"] and (tmp_path / "old.txt").read_text() == "old"


def test_info_on_a_closed_pipe(cat_patch):
    code = "import sys; from fmn.cli.commands import main; sys.exit(main(['info', sys.argv[1], '--json']))"
    r = subprocess.run(f"{sys.executable} -c \"{code}\" {cat_patch} | head -1", shell=True, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.stdout.strip() == "{" and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_bad_patch_in_info_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "not an fmn patch" in one_line_error(["info", str(bad)], capsys)


def test_no_temporary_tokenizer_folders(tmp_path, monkeypatch):
    from fmn.processors.tokenizer import clip_tokenizer
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tok = clip_tokenizer(words=["a red circle", "zebra"])
    assert tok("a red circle").input_ids and os.listdir(tmp_path) == []


def test_apply_folder_has_normal_permissions(sd1_folder, cat_patch, tmp_path):
    out = tmp_path / "patched"
    assert main(["apply", "--model", sd1_folder, "--patch", str(cat_patch), "--out", str(out), "-q"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_unknown_concept_words(tmp_path, capsys):
    from fmn.forgetting.concepts import check_concepts
    from fmn.toy import load_default_pipeline
    toy = load_default_pipeline()
    assert check_concepts(toy, ["circle", "red"]) == []
    (msg,) = check_concepts(toy, ["xq"])
    assert "'xq'" in msg and "does not know" in msg
    (emoji,) = check_concepts(toy, ["\N{GRINNING FACE}"])
    assert "no word for" in emoji
    with pytest.raises(ValueError, match="reads at most"):
        check_concepts(toy, ["circle " * 10])
    out = tmp_path / "p.safetensors"
    assert "--strict" in one_line_error(["forget", "--concept", "xq", "--strict", "--out", str(out), "-q"], capsys)
    assert not out.exists()


def test_export_command(cat_patch, tmp_path, capsys):
    for fmt, key in (("diffusers", ".lora_A.weight"), ("kohya", ".lora_down.weight")):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["export", str(cat_patch), "--format", fmt, "--out", str(out), "--rank", "2", "-q"]) == 0
        with safe_open(str(out), "pt") as f:
            keys = list(f.keys())
            downs = [f.get_tensor(k) for k in keys if k.endswith(key)]
        assert downs and all(d.shape[0] == 2 for d in downs)
        assert (fmt == "kohya") == all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith(".lora_B.bias" if fmt == "diffusers" else ".diff_b") for k in keys)  # biases travel
    assert "warning" not in capsys.readouterr().err
    out = tmp_path / "no-bias.safetensors"
    assert main(["export", str(cat_patch), "--format", "kohya", "--no-bias", "--out", str(out), "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        assert not any(k.endswith(".diff_b") for k in f.keys())
    err = capsys.readouterr().err
    assert "cannot hold" in err and "bias" in err  # left out: said so
    assert "--no-bias" in one_line_error(["export", str(cat_patch), "--format", "diffusers", "--no-bias", "--out",
                                          str(tmp_path / "x.safetensors")], capsys)
    assert "exists" in one_line_error(["export", str(cat_patch), "--format", "kohya", "--out",
                                       str(tmp_path / "kohya.safetensors")], capsys)
    assert "--format" in one_line_error(["export", str(cat_patch), "--format", "onnx", "--out",
                                         str(tmp_path / "x.safetensors")], capsys)
    assert sorted(os.listdir(tmp_path)) == ["diffusers.safetensors", "kohya.safetensors", "no-bias.safetensors"]


def test_labelled_grid_places_images_and_labels():
    from PIL import Image

    from fmn.cli.grid import cell, labelled_grid, layout
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (16, 16), c) for c in colours]
    rows, cols = ["a red circle", "a very long prompt " * 5], ["base s0", "patched s0"]
    grid = labelled_grid(images, rows, cols)
    lay = layout((16, 16), rows, cols)
    assert lay[0] > 1 and grid.size == cell(lay, 1, 1)[2:]  # scaled up to fit the column labels
    for i, colour in enumerate(colours):
        box = cell(lay, i // 2, i % 2)
        assert set(grid.crop(box).getdata()) == {colour}
    header = grid.crop((lay[1], 0, grid.size[0], lay[2]))
    margin = grid.crop((0, lay[2], lay[1], grid.size[1]))
    assert min(map(sum, header.getdata())) < 100 and min(map(sum, margin.getdata())) < 100  # dark text drawn
    with pytest.raises(ValueError):
        labelled_grid(images[:3], rows, cols)


def test_forget_help_names_the_defaults_that_apply(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at the terminal's width, hyphenated words too
    from fmn.toy.defaults import ANCHOR_STEPS, FORGET_DEFAULTS, ROBUST
    with pytest.raises(SystemExit) as info:
        main(["forget", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default 35" in text  # the paper's, for --model
    assert f"re-steering ({ROBUST['steps']} steps per concept at lr {ROBUST['lr']}" in text
    assert f"{ANCHOR_STEPS['shape']} steps per shape" in text and f"lr {FORGET_DEFAULTS['lr']}" in text
    assert "--steps 0: the closed-form edit alone" in text


def test_steps_0_is_the_closed_form_on_the_toy_and_an_error_elsewhere(sd1_folder, tmp_path, capsys):
    """`--steps 0` waits for the model's defaults: the built-in toy's closed form takes it (a patch in
    milliseconds); a model without a closed-form default gets one line naming the fix, and nothing written."""
    from fmn.patches.patch import Patch
    out = tmp_path / "toy.safetensors"
    assert main(["forget", "--concept", "circle", "--steps", "0", "--out", str(out), "-q"]) == 0
    patch = Patch.load(out)
    assert patch.options["closed_form"] is True and patch.summary["steps"] == 0
    msg = one_line_error(["forget", "--model", sd1_folder, "--concept", "cat", "--steps", "0",
                          "--out", str(tmp_path / "new" / "p.safetensors")], capsys)
    assert "closed_form" in msg and not (tmp_path / "new").exists()
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--steps", "0", "--closed-form", "--anchor",
                 "dog", "--out", str(tmp_path / "sd1.safetensors"), "-q"]) == 0
