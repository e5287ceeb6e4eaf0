"""fmn.runtime: the compile notice before a process's first CUDA run of the kernels, and the
autocast contexts (no weight-cast cache: CUDA graph capture refuses it)."""
import torch

import fmn.forgetting.runtime as runtime
import fmn.forgetting.trainer as trainer
from fmn.forgetting.options import ForgetOptions
from fmn.testing import tiny_sd_pipeline


def test_compile_notice_once_per_process_on_cuda_only(monkeypatch):
    monkeypatch.setitem(runtime._NOTICE, "given", False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert runtime.kernel_compile_notice(cpu, ForgetOptions()) is None
    assert runtime.kernel_compile_notice(cuda, ForgetOptions(backend="reference")) is None
    assert runtime.kernel_compile_notice(cuda, ForgetOptions(loss="visual")) is None  # no kernel: zeroing is SDPA
    line = runtime.kernel_compile_notice(cuda, ForgetOptions())
    assert "compiling the attention kernels" in line and "CUDA graphs" in line
    assert runtime.kernel_compile_notice(cuda, ForgetOptions()) is None  # once
    monkeypatch.setitem(runtime._NOTICE, "given", False)
    assert "CUDA graphs" not in runtime.kernel_compile_notice(cuda, ForgetOptions(cuda_graphs=False))


def test_trainer_prints_the_notice_before_the_first_step_with_progress(monkeypatch, capsys):
    monkeypatch.setattr(trainer, "kernel_compile_notice", lambda device, opts: "NOTICE-LINE")
    pipe = tiny_sd_pipeline("sd1")
    kw = dict(images=torch.randn(2, 4, 8, 8), steps=1, lr=1e-3, backend="reference", gen_steps=1)
    trainer.forget(pipe, "cat", progress=False, **kw)
    assert "NOTICE-LINE" not in capsys.readouterr().err
    trainer.forget(pipe, "cat", progress=True, **kw)
    assert "NOTICE-LINE" in capsys.readouterr().err


def test_autocast_has_no_weight_cache():
    opts = ForgetOptions(precision="bf16")
    with runtime.autocast_for(opts, torch.nn.Linear(2, 2), torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
