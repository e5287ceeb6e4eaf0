"""Ahead-of-time compile check in CI: the kernels compile for sm_80 and sm_90 within shared memory
and without register spills, on this CPU-only machine (Triton's compiler + ptxas, a fake driver).

CI runs a representative subset (`--subset ci`: SD 1.5's D=40 at L=77 (one key block, fused
backward) and FLUX.1's N=L=4608, D=128 (long-sequence path); fp32 with exact and with TF32 dots,
bf16; all masks; deterministic on and off). The full list (every shape, dtype, mask set and
gradient mode, sm_86 too) runs on demand:
    python -m fmn_kernels.aot --arch 90 --arch 80 --arch 86 --json 'bench/results/aot_sm{arch}.json'
Its committed results (bench/results/aot_sm{80,86,90}.json) are checked here too: no variant in them
may overflow, spill or fail; a run that was cut short says so in the file ("complete": false, the
cases missing), which this test reports but does not fail on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmn_kernels import aot

ROOT = Path(__file__).resolve().parents[2]


def test_ci_subset_fits_and_does_not_spill(tmp_path):
    if aot._ptxas_path() is None:
        pytest.skip("ptxas is missing from triton's nvidia backend: nothing can be compiled ahead of time")
    out = tmp_path / "aot.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "fmn_kernels.aot", "--arch", "90", "--arch", "80",
                           "--subset", "ci", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert {s["arch"] for s in payload["summary"]} == {80, 90}
    for result in payload["results"]:
        kernels = {row["kernel"] for row in result["variants"]}
        assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_delta_kernel"} <= kernels
        assert not result["errors"] and not aot.failures(result)
        for row in result["variants"]:
            assert row["regs"] and row["spill_stores"] == 0 and row["shared"] <= row["smem_limit"]


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_committed_full_run_is_clean(arch):
    path = ROOT / "bench" / "results" / f"aot_sm{arch}.json"
    payload = json.loads(path.read_text())
    assert payload["subset"] == "full"
    (result,) = payload["results"]
    assert result["arch"] == arch and len(result["variants"]) > 10
    problems = [p for p in aot.failures(result) if not p.startswith("incomplete run")]
    assert problems == []
    if not result["complete"]:
        print(f"sm_{arch}: committed AOT run covers {len(result['cases_done'])} cases, "
              f"{len(result['cases_missing'])} missing")


def test_failures_flag_overflow_and_spills():
    row = dict(arch=90, kernel="_fwd_kernel", BLOCK_M=64, BLOCK_N=128, BLOCK_D=64, ONE_KEY_BLOCK=True,
               num_warps=4, num_stages=1, shared=300000, smem_limit=232448, smem_ok=False, regs=255,
               spill_stores=8, spill_loads=8, cases=[dict(case="sd15-64px-D40", dtype="bf16", masks="all")])
    problems = aot.failures(dict(arch=90, variants=[row], errors=[]))
    assert len(problems) == 2 and "shared memory" in problems[0] and "spills" in problems[1]
    stale = dict(row, BLOCK_M=128, smem_ok=True, shared=1000, spill_stores=0, spill_loads=0)
    assert aot.failures(dict(arch=90, variants=[stale], errors=[])) == [
        "tile no longer in the table: _fwd_kernel BLOCK_M=128 BLOCK_N=128 BLOCK_D=64"]
    # sm_86-class targets are held to shared memory only: a spill there is reported, not a problem
    fits_on_sm86 = dict(row, arch=86, smem_ok=True, shared=1000, smem_limit=101376)
    assert aot.failures(dict(arch=86, variants=[fits_on_sm86], errors=[])) == []
    assert aot.failures(dict(arch=86, variants=[dict(fits_on_sm86, smem_ok=False)], errors=[]))
