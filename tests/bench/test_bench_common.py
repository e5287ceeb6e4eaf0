"""bench/common.py's run_variants: a variant that raises is reported and the others go on."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import run_variants, sdpa_backends  # noqa: E402


def test_a_failing_variant_is_reported_and_the_others_go_on():
    calls_made = {"late": 0}

    def late_failure():
        calls_made["late"] += 1
        if calls_made["late"] > 2:  # the memory call and one timed round pass, then it fails
            raise RuntimeError("cuDNN Frontend error: mha_graph.execute(...).is_good()\nstack ...")
        return 2.0

    def failing():
        raise RuntimeError("mha_graph.execute(...).is_good()\npages of context")
    calls = {"fused": lambda: 1.0, "stock": failing, "late": late_failure, "last": lambda: 3.0}
    snapshots = []
    rows = run_variants(calls, torch.device("cpu"), repeats=3,
                        checkpoint=lambda rs: snapshots.append({r["variant"]: r["status"] for r in rs}))
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == list(calls)
    assert by["fused"]["status"] == by["last"]["status"] == "ok"
    assert len(by["fused"]["ms_all"]) == len(by["last"]["ms_all"]) == 3 and by["fused"]["result"] == 1.0
    assert by["stock"]["status"] == "error" and "ms_median" not in by["stock"]
    assert by["stock"]["error"] == "RuntimeError: mha_graph.execute(...).is_good()"
    assert by["late"]["status"] == "error" and "is_good" in by["late"]["error"] and len(by["late"]["ms_all"]) == 1
    # a file written at each checkpoint shows the variant in progress before it runs
    assert {"fused": "ok", "stock": "running", "late": "pending", "last": "pending"} in snapshots


def test_sdpa_backends_names_the_kernel():
    q = torch.randn(1, 2, 8, 16)
    assert sdpa_backends(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) != []
    assert sdpa_backends(lambda: q * 2) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_context_is_usable_after_a_python_error():
    rows = run_variants({"bad": lambda: 1 / 0, "good": lambda: torch.ones(2, device="cuda").sum().item()},
                        torch.device("cuda"), repeats=1)
    assert [r["status"] for r in rows] == ["error", "ok"]
