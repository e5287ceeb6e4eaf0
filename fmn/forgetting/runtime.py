"""Where a run executes: the process's Accelerator, autocast for a precision, peak-memory probes."""
from __future__ import annotations

import os
import resource
import sys
import warnings

import torch

from fmn.forgetting.options import PRECISIONS

_ACCELERATOR = None


def accelerator():
    """One Accelerator per process (accelerate's state is a process-wide singleton). Precision is
    handled with torch.autocast (see `autocast_for`), so that runs with different precisions can share it."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        _ACCELERATOR = Accelerator(mixed_precision="no", cpu=launched_without_accelerator(),
                                   kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    return _ACCELERATOR


def launched_without_accelerator() -> bool:
    """Whether this process is one of several (torchrun, accelerate launch) on a machine without a GPU:
    accelerate then needs cpu=True for its gloo process group (`accelerate launch --cpu` says so itself;
    under torchrun it would otherwise run each process alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    probe = getattr(torch, "accelerator", None)
    return not (probe.is_available() if probe is not None else torch.cuda.is_available())


def autocast_for(opts, model: torch.nn.Module, device: torch.device):
    """A factory of autocast contexts for opts.precision; a half-precision model trains under its own
    dtype's autocast (opts.precision is updated, with a warning); fp16 is refused on the CPU."""
    dtype = next(model.parameters()).dtype
    if opts.precision == "fp32" and dtype != torch.float32:
        opts.precision = "bf16" if dtype == torch.bfloat16 else "fp16"
        warnings.warn(f"the UNet is in {dtype}; training with precision {opts.precision} autocast instead of fp32",
                      stacklevel=3)
    if opts.precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    amp_dtype, enabled = PRECISIONS[opts.precision], opts.precision != "fp32"
    # No weight-cast cache: CUDA graph capture refuses it, and each weight is cast once per call anyway.
    return lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=enabled, cache_enabled=False)


_NOTICE = {"given": False}


def kernel_compile_notice(device: torch.device, opts) -> str | None:
    """The line to show before a run's first step when it is the process's first run of the Triton
    kernels on CUDA (they compile for the GPU unless Triton's cache has them), then None.

    The kernels run where concept scores are needed (the attention loss); the visual loss alone and
    CPU runs compile nothing."""
    if _NOTICE["given"] or device.type != "cuda" or opts.backend not in ("auto", "triton") \
            or opts.loss not in ("attention", "both"):
        return None
    _NOTICE["given"] = True
    graphs = " and capturing CUDA graphs" if opts.cuda_graphs else ""
    return (f"fmn: first step: compiling the attention kernels for this GPU{graphs} "
            "(up to ~30 s on a fresh machine; cached for later runs)")


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """CUDA's peak allocated bytes since the reset; None on other devices."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_rss() -> int:
    """The process's peak resident set in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
