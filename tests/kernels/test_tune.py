"""fmn_kernels.tune: the dry run under the interpreter (tiny shapes, two candidates) writes its JSON,
and configs takes measured winners from such files for their GPU class (dry runs excepted)."""
import json

import pytest

from fmn_kernels import tune
from fmn_kernels.ops import configs
from fmn_kernels.utils import triton_interpreting


def test_dry_run_writes_candidates_and_winners(tmp_path):
    if not triton_interpreting():
        pytest.skip("the dry run is for the interpreter")
    out = tmp_path / "tune.json"
    saved = dict(configs.TUNED)
    assert tune.main(["--dry-run", "--out", str(out)]) == 0
    assert configs.TUNED == saved  # the sweep leaves the process's table as it was
    payload = json.loads(out.read_text())
    assert payload["dry_run"] and payload["complete"] and payload["gpu"] == "triton-interpreter"
    assert [r["kernel"] for r in payload["results"]] == ["fwd_long", "dkdv_long"]
    for result in payload["results"]:
        assert len(result["candidates"]) == 2 and all("ms" in c for c in result["candidates"])
        assert result["winner"] == min(result["candidates"], key=lambda c: c["ms"])["tile"]
    assert configs.load_tuned([out]) == {}  # a dry run is never taken as a measurement


def test_budget_stops_and_still_writes(tmp_path):
    if not triton_interpreting():
        pytest.skip("the dry run is for the interpreter")
    out = tmp_path / "tune.json"
    assert tune.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert not payload["complete"] and payload["winners"] == []


def test_configs_take_winners_for_their_gpu_class(tmp_path):
    path = tmp_path / "tune_h200.json"
    winner = dict(kernel="dkdv_long", precision="16bit", block_d=128, arch="sm90", tile=[64, 128, 8, 2])
    gone = dict(winner, kernel="no_such_kernel")
    path.write_text(json.dumps(dict(gpu="NVIDIA H200", arch="sm90", dry_run=False, winners=[winner, gone])))
    tuned = configs.load_tuned([path])
    assert tuned == {("dkdv_long", "16bit", 128, "sm90"): configs.Tile(64, 128, 8, 2)}
    saved = dict(configs.TUNED)
    try:
        configs.TUNED.clear()
        configs.TUNED.update(tuned)
        assert configs.table_tile("dkdv_long", "16bit", 128, "sm90") == configs.Tile(64, 128, 8, 2)
        assert configs.table_tile("dkdv_long", "16bit", 128, "sm90", tuned=False) != configs.Tile(64, 128, 8, 2)
        assert configs.table_tile("dkdv_long", "16bit", 128, "sm80") == configs.TABLE[
            ("dkdv_long", "16bit", 128)].get("sm80")
    finally:
        configs.TUNED.clear()
        configs.TUNED.update(saved)
    assert tune.gpu_slug("NVIDIA H200") == "h200" and tune.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"


def test_committed_tune_results_pass_the_gate():
    """Every committed measured winner compiled on its GPU with 0 spills within shared memory."""
    for path in sorted(configs.RESULTS.glob("tune_*.json")):
        payload = json.loads(path.read_text())
        for result in payload["results"]:
            if "winner" not in result:
                continue
            row = next(c for c in result["candidates"] if c["tile"] == result["winner"])
            assert row.get("spills", 0) == 0 and "error" not in row, (path.name, result["kernel"])
            if "shared" in row:
                assert row["shared"] <= configs.SMEM_LIMIT[payload["arch"]]


def test_warmup_counts_variants(capsys):
    if not triton_interpreting():
        pytest.skip("smoke run for the interpreter")
    from fmn_kernels import warmup

    assert warmup.main(["--family", "sd2", "--max-n", "40"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "kernel variants for sd2" in line and "_fwd_kernel 1" in line and "_bwd_dkdv_kernel 2" in line
