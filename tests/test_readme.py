"""The README's Python example for SD (its first `python` block with `fmn.forget(`) runs as written, with a
tiny SD 2.x pipeline in place of the hub model (from_pretrained is monkeypatched; nothing is downloaded)."""
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

import fmn_kernels.api
from fmn.testing import tiny_sd_pipeline

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "fmn.forget(" in b)
    calls = []

    def tiny(name, *args, **kwargs):
        calls.append(name)
        pipe = tiny_sd_pipeline("sd2")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", staticmethod(tiny))
    monkeypatch.chdir(tmp_path)
    # backend "auto" as on a CPU machine outside the tests (the native kernels, else the reference): under
    # Triton's interpreter, which tests/conftest.py turns on (fmn_kernels.api reads it once, at import), the
    # example's 2 x 35 steps and its 50-step generations take many minutes; the Triton kernels have their own tests
    monkeypatch.setattr(fmn_kernels.api, "TRITON_INTERPRETING", False)
    torch.manual_seed(0)
    scope = {}
    exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    assert calls == ["stabilityai/stable-diffusion-2-1-base"]
    assert scope["patch"].concepts == ["Van Gogh"] and scope["grumpy"].concepts == ["Grumpy Cat"]
    assert {p.name for p in tmp_path.iterdir()} == {"van-gogh.safetensors", "van-gogh-lora.safetensors",
                                                    "van-gogh-kohya.safetensors"}
    assert scope["small"].nbytes < scope["patch"].nbytes

