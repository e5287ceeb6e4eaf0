"""Test setup: without CUDA, Triton kernels run under the interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The oracle's matmuls run on cuBLAS under torch.use_deterministic_algorithms(True) in some GPU tests,
# which cuBLAS allows only with a fixed workspace (read when its first handle is made, hence here).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A time cap (`timeout`, as in scripts/gpu_check.sh) sends SIGTERM: end the session as Ctrl-C does, so that
# pytest still reports the tests run so far (summary, durations, --junitxml).
signal.signal(signal.SIGTERM, _interrupt)

# Tiny models on 2 cores: one thread avoids oversubscription, which slows them ~100x when the
# interpreter, torch and other test workers compete for the cores.
torch.set_num_threads(1)


import pytest  # noqa: E402
# transformers and diffusers give their root loggers a StreamHandler on sys.stderr the first time a logger
# is asked for; if that happens inside a test that captures stderr (capsys), the handler keeps the capture's
# stream, which is closed afterwards ("--- Logging error ---" in later tests). Configure them here, first.
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_transformers_logging.get_logger("transformers")
_diffusers_logging.get_logger("diffusers")

from helpers import FAST_CLI  # noqa: E402


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """A tiny SD 1.x pipeline saved as a folder (fmn.testing.save_tiny_pipeline), for CLI tests."""
    from fmn.testing import save_tiny_pipeline
    path = tmp_path_factory.mktemp("models") / "tiny-sd1"
    save_tiny_pipeline(path, "sd1")
    return str(path)


@pytest.fixture(scope="session")
def cat_patch(sd1_folder, tmp_path_factory):
    """`fmn forget --concept cat` on sd1_folder with FAST_CLI, alone in its folder; read-only for tests."""
    from fmn.cli.commands import main
    out = tmp_path_factory.mktemp("patches") / "cat.safetensors"
    assert main(["forget", "--model", sd1_folder, "--concept", "cat", "--out", str(out), *FAST_CLI]) == 0
    return out


@pytest.fixture(scope="session")
def toy_base():
    """The built-in toy pipeline (fmn.toy.load_default_pipeline), loaded once; tests copy it before changing it."""
    from fmn.toy import load_default_pipeline
    return load_default_pipeline()


@pytest.fixture(scope="session")
def toy_base_eval(toy_base):
    """The base toy model scored by fmn.toy.evaluate (25 prompts, seeds 0 and 1, default steps) with "circle"
    as the forgotten concept: test_forgetting_quality's "before", and test_toy's check that the base
    model draws the shapes and colours it is asked for (one generation of the 50 images for both)."""
    from fmn.toy import evaluate, load_classifier
    return evaluate(toy_base, forgotten="circle", seeds=[0, 1], classifier=load_classifier())
