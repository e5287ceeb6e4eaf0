"""Several processes on the CPU (gloo), started the way users start them: accelerate launch and torchrun.

- data parallel: 2 processes x batch 1 give the patch of 1 process x batch 2, within TOL; only process 0
  writes files and draws the grid;
- a process that fails stops the launch with one error line and nothing written;
- --concepts-file over 2 processes: one patch per line, a summary, a failed line named, resume, and each
  patch identical to a single-concept run with the same options.

Each launch costs ~10-20 s on 2 cores (two Python starts and two toy model loads), so there are three.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmn.cli.commands import main
from fmn.patches.patch import load_patch

ROOT = Path(__file__).resolve().parents[2]
ENTRY = str(Path(__file__).with_name("dist_entry.py"))  # fmn's CLI with test-only failure hooks and a write log
# the fastest training run of the toy model: 3 steps, 2 reference images of 2 steps, 4 cached retain / anchor
# samples; fp32 deltas (no fp16 rounding)
TRAIN = ["--no-closed-form", "--steps", "3", "--gen-steps", "2", "--n-images", "2", "--retain-samples", "4",
         "--backend", "reference", "--patch-dtype", "fp32", "-q"]
# Data parallel changes only the order of floating-point sums (the loss's sum over samples, the gradient
# average), so the two patches differ by rounding carried through 3 AdamW steps (largest where a gradient is
# near AdamW's eps). Measured with TRAIN on the toy (2-core x86): at most 1.2e-4 relative (Frobenius, per
# tensor) between 2 x 1 and 1 x 2, and up to 1.1e-4 between two 1 x 2 runs that differ only in their thread
# count (1 vs 2: the same kind of reordering). TOL is 16x that, for other CPUs' roundings; a change of the
# math (batch 1 instead of 2: >= 0.31 on every tensor; per-process noise or timesteps; a per-process sqrt in
# the attention loss) moves the patch by O(0.1-1) relative, and the first of these is checked below.
TOL = 2e-3


def launch(args, *, accelerate=False, env=(), timeout=300):
    """fmn (tests/dist_entry.py) in 2 processes; the CompletedProcess."""
    if accelerate:  # --multi_gpu: accelerate's torchrun launcher (its --cpu one starts a single process)
        cmd = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    else:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    full_env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **dict(env)}
    return subprocess.run([sys.executable, *cmd, ENTRY, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def errors(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("fmn: error:")]


def rel_errors(patch, reference) -> dict:
    """Per tensor: ||patch - reference|| / ||reference|| (Frobenius)."""
    assert patch.tensors.keys() == reference.tensors.keys()
    return {k: float((patch.tensors[k].float() - v.float()).norm() / v.float().norm())
            for k, v in reference.tensors.items()}


def test_two_processes_give_the_one_process_patch(tmp_path):
    log, out, grid = tmp_path / "log", tmp_path / "out" / "p.safetensors", tmp_path / "out" / "grid.png"
    log.mkdir()
    r = launch(["forget", "--concept", "circle", *TRAIN, "--batch-size", "1", "--out", str(out),
                "--grid", str(grid), "--grid-steps", "1"], accelerate=True, env={"FMN_TEST_LOG": str(log)})
    assert r.returncode == 0, r.stderr[-3000:]
    # one process with the global batch (2), and with one process's (1): the tolerance tells them apart
    two, one = tmp_path / "b2.safetensors", tmp_path / "b1.safetensors"
    assert main(["forget", "--concept", "circle", *TRAIN, "--batch-size", "2", "--out", str(two)]) == 0
    assert main(["forget", "--concept", "circle", *TRAIN, "--batch-size", "1", "--out", str(one)]) == 0
    dp, single, small = load_patch(out), load_patch(two), load_patch(one)
    assert max(rel_errors(dp, single).values()) <= TOL
    assert min(rel_errors(small, single).values()) > 50 * TOL
    assert dp.summary["processes"] == 2 and dp.summary["global_batch_size"] == 2
    torch.testing.assert_close(torch.tensor(dp.summary["losses"]), torch.tensor(single.summary["losses"]),
                               rtol=TOL, atol=0)
    # only process 0 drew the grid and wrote files: the patch and the grid, nothing left beside them
    assert not (log / "rank1.log").exists()
    written = (log / "rank0.log").read_text().splitlines()
    assert "grid" in written and f"write {out}" in written and f"write {grid}" in written
    assert sorted(os.listdir(out.parent)) == ["grid.png", "p.safetensors"]


def test_a_failing_process_stops_the_launch_and_nothing_is_written(tmp_path):
    out = tmp_path / "out" / "p.safetensors"
    r = launch(["forget", "--concept", "circle", *TRAIN, "--out", str(out)], env={"FMN_TEST_FAIL_RANK": "1"})
    assert r.returncode != 0
    assert errors(r) == ["fmn: error: process 1 of 2: RuntimeError: injected failure in process 1"], r.stderr[-3000:]
    assert not out.parent.exists()  # no patch, no temporary file, no folder


def patch_files(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))


def test_concepts_file_over_two_processes(tmp_path):
    concepts, out = tmp_path / "concepts.txt", tmp_path / "patches"
    concepts.write_text("# shapes and colours of the toy model\ncircle\n\nred\n  square, star  \nblue\nheart\n")
    r = launch(["forget", "--concepts-file", str(concepts), "--out-dir", str(out), "--steps", "0", "-q"],
               env={"FMN_TEST_FAIL_CONCEPT": "heart"})
    # heart failed: named in the one error line, non-zero exit; the others written
    assert r.returncode != 0
    assert len(errors(r)) == 1 and "heart" in errors(r)[0] and "injected failure" in errors(r)[0], r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["failed"] == ["heart"] and summary["done"] == 4
    assert [x["file"] for x in summary["results"]] == ["circle.safetensors", "red.safetensors",
                                                       "square+star.safetensors", "blue.safetensors",
                                                       "heart.safetensors"]
    assert {x["process"] for x in summary["results"]} == {0, 1}  # spread over both processes
    assert patch_files(out) == ["blue.safetensors", "circle.safetensors", "red.safetensors",
                                "square+star.safetensors"]
    assert load_patch(out / "square+star.safetensors").concepts == ["square", "star"]
    # resume (one process): the four are skipped, untouched; heart is done now
    before = {f: (out / f).stat().st_mtime_ns for f in patch_files(out)}
    assert main(["forget", "--concepts-file", str(concepts), "--out-dir", str(out), "--steps", "0", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [x["status"] for x in summary["results"]] == ["skipped"] * 4 + ["done"]
    assert all((out / f).stat().st_mtime_ns == t for f, t in before.items())
    # each patch is the one a single-concept run with the same options writes (same thread count: bit for bit)
    for group in (["circle"], ["red"], ["square", "star"], ["blue"]):
        single = tmp_path / "single.safetensors"
        argv = ["forget", "--out", str(single), "--force", "--steps", "0", "-q"]
        argv += [x for c in group for x in ("--concept", c)]
        assert main(argv) == 0
        got, want = load_patch(out / ("+".join(group) + ".safetensors")), load_patch(single)
        assert got.tensors.keys() == want.tensors.keys() and got.options == want.options
        assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors), group


@pytest.mark.parametrize("bad", [["--concept", "circle"], ["--out", "x.safetensors"], ["--grid", "g.png"]])
def test_concepts_file_refuses_single_patch_options(tmp_path, bad, capsys):
    concepts = tmp_path / "c.txt"
    concepts.write_text("circle\n")
    rc = main(["forget", "--concepts-file", str(concepts), "--out-dir", str(tmp_path / "o"), *bad, "-q"])
    assert rc == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
