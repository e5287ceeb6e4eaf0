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


def _version(module: str) -> str:
    """A package's version, or "not installed" (a GPU box may have only torch and triton)."""
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
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


# ---------------------------------------------------------------- variants that may fail

SDPA_KERNELS = {  # the aten op each SDPA backend runs, as the torch profiler names it
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient (mem-efficient)",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu flash",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def sdpa_backends(fn) -> list[str]:
    """The SDPA backends fn() runs, read from the torch profiler (CPU activity: the aten op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return sorted({backend for op, backend in SDPA_KERNELS.items() if op in names})


def sdpa_settings() -> dict:
    """Which SDPA backends torch may pick (torch.backends.cuda flags; CUDA only)."""
    if not torch.cuda.is_available():
        return {}
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}


def short_error(e: BaseException) -> str:
    """Type and first line of an exception (CUDA errors come with pages of context)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def cuda_context_lost(device: torch.device) -> bool:
    """After a CUDA error: True when the context is unusable (an illegal memory access poisons it)."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return False
    except Exception:  # any error here: the context is gone
        return True


def timed_ms(fn, device: torch.device) -> float:
    """Wall time of one fn() call in ms (CUDA: synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure_peak(fn, device: torch.device):
    """(result of fn(), extra MiB above the state before, total MiB at the peak). CUDA: the caching
    allocator's peak; CPU: VmHWM after a clear_refs reset (ru_maxrss growth where that is missing)."""
    import resource

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return result, (peak - before) / 2**20, peak / 2**20
    if reset_peak_rss():
        before = proc_status_kib("VmRSS")
        result = fn()
        peak = proc_status_kib("VmHWM")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak <= before:
            return result, float("nan"), float("nan")
    return result, (peak - before) / 1024, peak / 1024


def run_variants(calls: dict, device: torch.device, repeats: int, checkpoint=None, warmup: int = 1) -> list[dict]:
    """Rows {variant, status, error, result, peak_extra_mib, peak_total_mib, ms_median, ms_all}.

    Each variant's first call measures peak memory (and is a warm-up), then `repeats` rounds time
    the variants alternately (the order reversed every other round, so load on a shared machine
    hits all alike). A variant that raises is reported (status "error" and the message) and
    dropped; the others go on. After a CUDA error that leaves the context unusable, the variants
    not yet run are "skipped". checkpoint(rows) runs before each variant's first call and after
    each stage: a result file written there shows what ran even if the process dies (a variant
    left "running" is the one it died in). Run the variants most likely to fail last.
    """
    rows = {v: {"variant": v, "status": "pending"} for v in calls}
    save = (lambda: checkpoint(list(rows.values()))) if checkpoint else (lambda: None)
    lost = None

    def failed(variant, e):
        nonlocal lost
        rows[variant].update(status="error", error=short_error(e))
        print(f"{variant}: FAILED {short_error(e)}", flush=True)
        if cuda_context_lost(device):
            lost = variant

    for variant, fn in calls.items():
        if lost:
            rows[variant].update(status="skipped", error=f"the CUDA context was lost when {lost!r} failed")
            continue
        rows[variant]["status"] = "running"
        save()
        try:
            result, extra, total = measure_peak(fn, device)
            for _ in range(warmup - 1):
                fn()
            rows[variant].update(status="ok", result=result, peak_extra_mib=extra, peak_total_mib=total)
        except Exception as e:  # report it, go on with the others
            failed(variant, e)
        save()
    times = {v: [] for v in calls if rows[v]["status"] == "ok"}
    for round_ in range(repeats):
        for variant in (list(times) if round_ % 2 == 0 else list(times)[::-1]):
            if lost or rows[variant]["status"] != "ok":
                continue
            try:
                times[variant].append(timed_ms(calls[variant], device))
            except Exception as e:
                failed(variant, e)
    for variant, ts in times.items():
        if ts:
            rows[variant].update(ms_median=statistics.median(ts), ms_all=ts)
    save()
    return list(rows.values())
