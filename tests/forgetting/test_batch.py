"""fmn.batch in one process: the concepts file, patch names, forget_each's patches, summary and resume.
(Over several processes: tests/forgetting/test_distributed.py.)"""
import json
import os

import pytest

import fmn
from fmn.forgetting.batch import format_table, patch_names, read_concepts_file, slug
from fmn.cli.commands import main
from fmn.patches.patch import load_patch


def test_concepts_file_lines(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# a comment\n\ncircle\n  red , blue  \n   # indented comment\nC# logo\n")
    assert read_concepts_file(f) == [["circle"], ["red", "blue"], ["C# logo"]]
    f.write_text("circle\nred,,blue\n")
    with pytest.raises(ValueError, match=r"c\.txt:2: an empty concept"):
        read_concepts_file(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no concepts"):
        read_concepts_file(f)
    with pytest.raises(ValueError, match="no such file"):
        read_concepts_file(tmp_path / "missing.txt")


def test_patch_names_are_safe_and_distinct():
    assert slug(["a red circle"]) == "a-red-circle"
    assert slug(["square", "star"]) == "square+star"
    assert slug(["Café au lait"]) == "cafe-au-lait"
    assert slug(["../../etc/passwd"]) == "etc-passwd"
    assert slug(["con"]) == "con-" and slug(["summary"]) == "summary-"  # a Windows device name; the summary's
    kanji = slug(["日本"])
    assert kanji.isascii() and len(kanji) == 8 and kanji != slug(["中国"])  # no letters to keep: a hash
    long = slug(["x" * 300])
    assert len(long) <= 80 and long != slug(["x" * 299])
    with pytest.raises(ValueError, match=r"\['Cat'\] and \['cat'\] would both be written to cat.safetensors"):
        patch_names([["Cat"], ["dog"], ["cat"]])
    with pytest.raises(ValueError, match="a-cat"):
        patch_names([["a cat"], ["a-cat"]])


def files(folder):
    return sorted(os.listdir(folder))


def test_forget_each_writes_skips_and_redoes(toy_base, tmp_path):
    out = tmp_path / "patches"
    seen = []
    summary = fmn.forget_each(toy_base, ["circle", ["red", "blue"]], out, steps=0, report=seen.append, progress=False)
    assert files(out) == ["circle.safetensors", "red+blue.safetensors", "summary.json"]
    assert summary["done"] == 2 and summary["failed"] == [] and summary["processes"] == 1
    assert [r["concepts"] for r in seen] == [["circle"], ["red", "blue"]]
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
    assert load_patch(out / "red+blue.safetensors").concepts == ["red", "blue"]
    r = summary["results"][0]
    assert r["status"] == "done" and r["patch_bytes"] == (out / "circle.safetensors").stat().st_size
    table = format_table(summary)
    assert table.splitlines()[0].split()[:3] == ["concept", "status", "seconds"] and "red, blue" in table
    # resume: both skipped, untouched; a third one done
    mtime = (out / "circle.safetensors").stat().st_mtime_ns
    summary = fmn.forget_each(toy_base, ["circle", ["red", "blue"], "heart"], out, steps=0, progress=False)
    assert [r["status"] for r in summary["results"]] == ["skipped", "skipped", "done"]
    assert (out / "circle.safetensors").stat().st_mtime_ns == mtime
    # force redoes it; a file holding another concept's patch is a failure, named, not overwritten
    os.replace(out / "heart.safetensors", out / "star.safetensors")
    summary = fmn.forget_each(toy_base, ["circle", "star"], out, steps=0, force=False, progress=False)
    assert summary["failed"] == ["star"] and "holds a patch for ['heart']" in summary["results"][1]["error"]
    summary = fmn.forget_each(toy_base, ["circle"], out, steps=0, force=True, progress=False)
    assert summary["done"] == 1 and (out / "circle.safetensors").stat().st_mtime_ns != mtime


def test_forget_each_refuses_bad_input_before_any_work(toy_base, tmp_path):
    with pytest.raises(ValueError, match="must be a non-empty list"):
        fmn.forget_each(toy_base, "circle", tmp_path / "o")
    with pytest.raises(ValueError, match=r"concepts \['circle', 'circle'\]: concepts repeat"):
        fmn.forget_each(toy_base, ["red", ["circle", "circle"]], tmp_path / "o")
    with pytest.raises(ValueError, match="lr must be positive"):
        fmn.forget_each(toy_base, ["red"], tmp_path / "o", lr=-1.0)
    assert not (tmp_path / "o").exists()


def test_cli_concepts_file_errors(tmp_path, capsys):
    f, out = tmp_path / "c.txt", tmp_path / "o"
    f.write_text("cat\nCat\n")
    assert main(["forget", "--concepts-file", str(f), "--out-dir", str(out), "-q"]) == 2
    assert "would both be written to cat.safetensors" in capsys.readouterr().err
    assert main(["forget", "--concepts-file", str(f), "-q"]) == 2
    assert "--concepts-file and --out-dir go together" in capsys.readouterr().err
    assert main(["forget", "--out", str(tmp_path / "p.safetensors"), "-q"]) == 2
    assert "--concept and --out" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    f.write_text("circle\n")
    assert main(["forget", "--concepts-file", str(f), "--out-dir", str(tmp_path / "file"), "-q"]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert files(tmp_path) == ["c.txt", "file"]
