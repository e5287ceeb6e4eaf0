"""Where a run executes: the process's Accelerator, autocast for a precision, peak-memory probes."""
from __future__ import annotations

import os
import resource
import sys
import warnings

import torch

from fmn.options import PRECISIONS

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
    return lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=enabled)


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
