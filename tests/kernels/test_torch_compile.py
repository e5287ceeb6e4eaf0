"""torch.compile(fullgraph=True) through fmn_kernels.cross_attention: no graph break, same results.

The Triton path is a torch.library custom op (fmn_kernels::concept_attention_fwd / _bwd) with fake
and autograd implementations, so Dynamo and AOTAutograd trace it as one opaque node; the reference
backend is plain PyTorch and compiles like any other code. On this CPU machine the Triton op runs
under the interpreter, and the compiler backend is "aot_eager" (Dynamo with fullgraph=True, fake
tensors and AOTAutograd's joint graph, without Inductor's slow C++ build); with CUDA it is Inductor.
backend="auto" on CPU tensors is checked in fresh processes whose first call is the compiled one, with
the native CPU library loaded and with it hidden (FMN_DISABLE_CPU_KERNELS=1): the library search and
the backend choice happen at import, never inside the traced call. The file is marked `gpu`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fmn_kernels
from fmn_kernels.ops.cpu_attention import DISABLE_ENV, cpu_backend_available
from fmn_kernels.utils import triton_interpreting

from attention_checks import make_inputs, make_masks

COMPILER = "inductor" if torch.cuda.is_available() else "aot_eager"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu


def loss_fn(backend):
    def loss(q, k, v, weights, zero_mask, key_mask):
        out, score = fmn_kernels.cross_attention(q, k, v, concept_weights=weights, zero_mask=zero_mask,
                                                 key_mask=key_mask, backend=backend)
        return (out.float() * 0.5).square().sum() + (score * 3).sum(), out
    return loss


def eager_and_compiled(backend, dtype):
    q, k, v = (t.to(DEVICE) for t in make_inputs(2, 2, 24, 77, 40, dtype, seed=11))
    weights, zero_mask, key_mask = (t.to(DEVICE) for t in make_masks(2, 77, seed=11))
    results = []
    for fn in (loss_fn(backend), torch.compile(loss_fn(backend), fullgraph=True, backend=COMPILER)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        loss, out = fn(*leaves, weights, zero_mask, key_mask)
        grads = torch.autograd.grad(loss, leaves)
        results.append((loss.detach(), out.detach(), grads))
    return results


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_fullgraph_matches_eager(backend):
    if backend == "triton" and not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)")
    torch._dynamo.reset()
    (eager_loss, eager_out, eager_grads), (loss, out, grads) = eager_and_compiled(backend, torch.float32)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_custom_op_passes_opcheck():
    """torch.library's own consistency checks: schema, fake tensor shapes/strides, autograd."""
    from fmn_kernels.ops import cross_attention as ops

    if not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_inputs(1, 2, 17, 77, 40, torch.float32, seed=12))
    weights, zero_mask, key_mask = (t.to(DEVICE) for t in make_masks(1, 77, seed=12))
    torch.library.opcheck(ops.concept_attention_fwd, (q, k, v, weights, zero_mask, key_mask, 0.2, 0, 1024),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# Run by a fresh interpreter: the compiled call is the process's first call into fmn_kernels. It prints which
# backend "auto" chose, the warnings seen at import, and how far compiled and eager results are apart.
FIRST_CALL_COMPILED = """
import json, warnings
import torch
torch.set_num_threads(1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fmn_kernels
    import fmn_kernels.api
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (8, 5, 5))
weights = torch.rand(1, 5, generator=g)

def loss(q, k, v):
    out, score = fmn_kernels.cross_attention(q, k, v, concept_weights=weights, backend="auto")
    return out.square().sum() + score.sum()

results = []
for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    value = fn(*leaves)
    results.append([value.detach(), *torch.autograd.grad(value, leaves)])
diff = max((a - b).abs().max().item() for a, b in zip(*results))
print(json.dumps(dict(backend=fmn_kernels.api.CPU_AUTO_BACKEND, diff=diff,
                      warnings=[str(w.message) for w in caught if w.category is RuntimeWarning])))
"""


@pytest.mark.parametrize("library", ["present", "hidden"])
def test_auto_backend_compiles_fullgraph_as_the_first_call(library):
    """backend="auto" on CPU tensors under torch.compile(fullgraph=True), first call of a fresh process:
    the native kernels when the library is there, else the reference with the import-time warning."""
    if library == "present" and not cpu_backend_available():
        pytest.skip("native CPU kernels not built (see scripts/setup.sh)")
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", DISABLE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if library == "hidden":
        env[DISABLE_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Same process, same kernels, eager vs compiled: only the float32 rounding of the loss's sum may differ.
    assert report["diff"] < 1e-4, report
    if library == "present":
        assert report["backend"] == "cpu" and report["warnings"] == [], report
    else:
        assert report["backend"] == "reference", report
        assert any(f"disabled by {DISABLE_ENV}=1" in w for w in report["warnings"]), report
