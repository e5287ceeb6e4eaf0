"""bench/bench_host.py runs on any CPU (Triton's launch no-op'd) and writes its table: a smoke run
with few iterations; the goals (30 us forward, 60 us backward) are measured, not asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_host_runs_and_counts_launches(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_host.py"), "--device", "cpu", "--iters", "20",
                           "--repeats", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    rows = {r["call"]: r for r in payload["rows"]}
    assert rows["fwd, no grad (inference)"]["launches"] == 1
    # SD 2.1 at L = 77 on an H200 plan: the fused backward and the split sum, nothing else
    assert rows["bwd, ops.backward alone"]["launches"] == 2
    assert all(r["host_us"] > 0 for r in payload["rows"]) and payload["machine"]["torch"]
