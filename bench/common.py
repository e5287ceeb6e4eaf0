"""Shared benchmark plumbing: machine description, timing, peak memory, atomic result files."""
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# stabilityai/stable-diffusion-2-1-base unet/config.json
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, dual_cross_attention=False,
)


def _mmap_large_blocks() -> None:
    """glibc: serve blocks >= 64 KiB from mmap, so freed tensors leave the resident set at once
    and CPU peak memory can be read off it. Done at import, before any tensor is freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_mmap_large_blocks()


def machine_info() -> dict:
    import diffusers
    import transformers
    import triton

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def device_tag(device: torch.device) -> str:
    """A short file-name tag: 'cpu' or the GPU's name, e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds (CUDA: triton's do_bench with its L2 flush)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(50, 10 * repeats), return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn, device: torch.device) -> float:
    """Peak memory allocated by one call of fn() above what was allocated before it, in MiB.

    CUDA: the caching allocator's peak counter. CPU (Linux): the resident set's high-water mark
    (VmHWM, reset through /proc/self/clear_refs) above the resident set before the call.
    NaN where /proc is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not reset_peak_rss():
        return float("nan")
    before = proc_status_kib("VmRSS")
    fn()
    return (proc_status_kib("VmHWM") - before) / 1024


def proc_status_kib(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Frees what glibc holds (malloc_trim), then resets VmHWM to the current resident set through
    /proc/self/clear_refs; False where either is unavailable (no Linux /proc, another libc)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        proc_status_kib("VmRSS")
        return True
    except (OSError, AttributeError, ValueError):
        return False


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=2)
        tmp = f.name
    os.chmod(tmp, 0o644)  # NamedTemporaryFile makes 0600 files
    os.replace(tmp, path)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)
