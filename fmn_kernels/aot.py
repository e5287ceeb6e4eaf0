"""Ahead-of-time compile check of the Triton kernels for real GPUs, on a machine without one.

    python -m fmn_kernels.aot --arch 90 --arch 80 [--arch 86] [--subset ci|full] [--json FILE]

For each target it runs the host code (fmn_kernels.ops.cross_attention.forward / backward) on CPU
tensors of real model shapes, with a fake Triton driver that reports the target, and Triton's
JITFunction.run patched to compile without launching (warmup). So every kernel variant that the
host would launch on that GPU -- tiles, constexprs, warps, stages, integer specialisation -- is
compiled by Triton and ptxas, and a variant above the target's shared memory raises OutOfResources
as it would when loaded on the GPU (the host then falls back to a smaller tile: counted as a failure
of the table here). Per compiled variant it reports shared memory, registers, spill bytes (ptxas -v)
and the number of vector / scalar global loads in the PTX.

Exit status 1 when any variant exceeds shared memory, spills (sm_86-class targets: shared memory
only, spills are reported), or needed a fallback tile; 2 when ptxas is missing. Each target
compiles in its own process (the fake driver must not meet real Triton use); this process only
starts them and merges their results.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH_SM_COUNT = {90: 132, 80: 108, 86: 84, 89: 128}

# (name, B, H, N, L, D): the attention calls of each model at its native resolution, batch 2
# (classifier-free guidance). SD3.5 / FLUX: joint attention over image + text tokens.
SHAPES_FULL = [
    ("sd15-64px-D40", 2, 8, 4096, 77, 40), ("sd15-32px-D80", 2, 8, 1024, 77, 80),
    ("sd15-16px-D160", 2, 8, 256, 77, 160), ("sd15-8px-D160", 2, 8, 64, 77, 160),
    ("sd21-64px-D64", 2, 5, 4096, 77, 64), ("sd21-32px-D64", 2, 10, 1024, 77, 64),
    ("sd21-16px-D64", 2, 20, 256, 77, 64),
    ("sdxl-128px-D64", 2, 10, 4096, 77, 64), ("sdxl-64px-D64", 2, 20, 1024, 77, 64),
    ("sd35m-joint-D64", 2, 24, 4429, 4429, 64), ("flux1-joint-D128", 1, 24, 4608, 4608, 128),
    ("odd-L300-D128", 1, 4, 1000, 300, 128), ("odd-L154-D256", 1, 2, 333, 154, 256),
]
SHAPES_CI = [SHAPES_FULL[0], SHAPES_FULL[10]]
DTYPES_FULL = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")
DTYPES_CI = ("fp32-ieee", "fp32-tf32", "bf16")
# none: plain attention; weights: the trainer's concept weights; all: weights, zero mask, key mask.
MASKS_FULL = ("all", "weights", "none")
MASKS_CI = ("all",)
# out+score: the fused loss uses both outputs; score: the attention loss alone (no dO).
GRADS_FULL = ("out+score", "score")
GRADS_CI = ("out+score",)


def _ptxas_path():
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


class _Recorder:
    """Patches JITFunction.run: compile for the fake target, never launch; record each variant."""

    def __init__(self, arch, smem_limit):
        self.arch, self.smem_limit = arch, smem_limit
        self.variants = {}  # compiled kernel hash -> row
        self.context = {}

    def install(self):
        import triton
        from triton.runtime import jit
        from triton.runtime.errors import OutOfResources

        original = jit.JITFunction.run
        recorder = self
        triton.knobs.nvidia.dump_ptxas_log = True

        def run(fn_self, *args, grid, warmup, **kwargs):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                kernel = original(fn_self, *args, grid=grid, warmup=True, **kwargs)
            row = recorder.record(fn_self.fn.__name__, kernel, log.getvalue(), kwargs, grid)
            if not row["smem_ok"]:
                raise OutOfResources(row["shared"], recorder.smem_limit, "shared memory")
            return kernel

        jit.JITFunction.run = run

    def record(self, name, kernel, ptxas_log, kwargs, grid):
        row = self.variants.get(kernel.hash)
        if row is None:
            md = kernel.metadata
            row = dict(arch=self.arch, kernel=name, num_warps=md.num_warps, num_stages=md.num_stages,
                       shared=md.shared, smem_limit=self.smem_limit, smem_ok=md.shared <= self.smem_limit,
                       **{k: v for k, v in kwargs.items() if k.isupper()}, **_ptxas_numbers(ptxas_log),
                       **_load_counts(kernel.asm.get("ptx", "")), cases=[])
            self.variants[kernel.hash] = row
            print(f"sm_{self.arch} {name} {self.context.get('case')} {self.context.get('dtype')} "
                  f"BLOCK_M={row.get('BLOCK_M')} BLOCK_N={row.get('BLOCK_N')} warps={md.num_warps} "
                  f"stages={md.num_stages}: shared {md.shared}, regs {row['regs']}, spills {row['spill_stores']}",
                  file=sys.stderr, flush=True)
        grid = grid if isinstance(grid, tuple) else ()
        row["cases"].append(dict(self.context, grid=list(grid)))
        return row


def _ptxas_numbers(log):
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs:
        return dict(regs=None, spill_stores=None, spill_loads=None)
    return dict(regs=int(regs[-1]), spill_stores=int(spills[-1][0]) if spills else None,
                spill_loads=int(spills[-1][1]) if spills else None)


def _load_counts(ptx):
    loads = re.findall(r"ld\.global[\w.]*", ptx)
    vector = sum(1 for op in loads if ".v2" in op or ".v4" in op or ".v8" in op)
    return dict(vector_loads=vector, scalar_loads=len(loads) - vector)


def _install_fake_driver(arch, smem_limit):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Utils:
        @staticmethod
        def get_device_properties(device):
            return dict(max_shared_mem=smem_limit, multiprocessor_count=ARCH_SM_COUNT.get(arch, 100),
                        max_num_regs=65536, warpSize=32)

    class FakeDriver:
        utils = Utils()

        def is_active(self):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

    driver.set_active(FakeDriver())


def _inputs(B, H, N, L, D, dtype_name, masks):
    """Zero tensors in diffusers' layout: q [B, N, H, D] in memory, k and v from one fused projection."""
    import torch

    dtype = {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16}[dtype_name]

    q = torch.zeros(B, N, H, D, dtype=dtype).transpose(1, 2)
    kv = torch.zeros(B, L, 2, H, D, dtype=dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    w = torch.zeros(B, L) if masks in ("weights", "all") else None
    zero = torch.zeros(B, L, dtype=torch.bool) if masks in ("zero", "all") else None
    valid = torch.ones(B, L, dtype=torch.bool) if masks == "all" else None
    return q, k, v, w, zero, valid


def _compile_cases(recorder, shapes, dtypes, mask_sets, grad_modes, checkpoint, skip=()):
    """Runs the host code for every case; checkpoint(errors, done) after each (masks, shape, dtype).
    The worst case (all masks) comes first, so an interrupted run has still covered every shape."""
    import torch

    errors = []
    for masks in mask_sets:
        for name, B, H, N, L, D in shapes:
            for dtype_name in dtypes:
                if f"{masks}/{name}/{dtype_name}" in skip:
                    continue
                torch.backends.cuda.matmul.allow_tf32 = dtype_name == "fp32-tf32"
                inputs = _inputs(B, H, N, L, D, dtype_name, masks)
                for grads in grad_modes:
                    if grads == "score" and masks != "weights":  # the attention loss: weights alone
                        continue
                    for det in (False,):  # the backward has no atomics: deterministic either way
                        recorder.context = dict(case=name, dtype=dtype_name, masks=masks, grads=grads,
                                                deterministic=det)
                        error = _compile_case(inputs, D ** -0.5, grads, det)
                        if error:
                            errors.append(dict(recorder.context, error=error))
                checkpoint(errors, f"{masks}/{name}/{dtype_name}")
    return errors


def _compile_case(inputs, scale, grads, deterministic):
    """Forward and backward through the host code (compiles, launches nothing); an error or None."""
    import torch

    from fmn_kernels.ops import cross_attention as ca

    q, k, v, w, zero, valid = inputs
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, score, lse = ca.forward(q, k, v, w, zero, valid, scale)
        dout = torch.zeros_like(out) if grads == "out+score" else None
        dscore = torch.zeros_like(lse) if w is not None else None
        ca.backward(q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale)
    except Exception as e:  # recorded, and fails the check
        return f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        torch.use_deterministic_algorithms(False)
    return None


def worker(arch, subset, out_path, shape_names=None, dtype_names=None, skip=()):
    """Runs in its own process: compile every variant for one target, write rows as JSON."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"fmn-aot-sm{arch}-")
    from .ops.configs import SMEM_LIMIT, arch_class

    smem_limit = SMEM_LIMIT[arch_class(arch)]
    _install_fake_driver(arch, smem_limit)
    recorder = _Recorder(arch, smem_limit)
    recorder.install()
    full = subset == "full"
    shapes = SHAPES_FULL if full else SHAPES_CI
    if shape_names:
        shapes = [s for s in SHAPES_FULL if s[0] in shape_names.split(",")]
    dtypes = dtype_names.split(",") if dtype_names else (DTYPES_FULL if full else DTYPES_CI)
    done = []

    def checkpoint(errors, case):  # a partial file survives an interrupted run, marked incomplete
        done.append(case)
        _write_json(out_path, dict(arch=arch, variants=list(recorder.variants.values()), errors=errors,
                                   cases_done=done, complete=False))

    errors = _compile_cases(recorder, shapes, dtypes, MASKS_FULL if full else MASKS_CI,
                            GRADS_FULL if full else GRADS_CI, checkpoint, skip)
    import shutil

    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    _write_json(out_path, dict(arch=arch, variants=list(recorder.variants.values()), errors=errors,
                               cases_done=done, complete=True))


def _write_json(path, payload):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def failures(result):
    """Problems of one target's result: overflows, spills, fallbacks, errors (strings)."""
    problems = [f"error: {e}" for e in result["errors"]]
    problems += [f"tile no longer in the table: {r['kernel']} BLOCK_M={r.get('BLOCK_M')} BLOCK_N={r.get('BLOCK_N')} "
                 f"BLOCK_D={r.get('BLOCK_D')}" for r in result["variants"] if not matches_table(r)]
    if not result.get("complete", True):
        missing = result.get("cases_missing")
        problems.append(f"incomplete run: {len(result.get('cases_done', []))} (masks/shape/dtype) cases compiled"
                        + (f", {len(missing)} missing" if missing else ""))
    for row in result["variants"]:
        label = f"{row['kernel']} BLOCK_M={row.get('BLOCK_M')} BLOCK_N={row.get('BLOCK_N')} " \
                f"BLOCK_D={row.get('BLOCK_D')} warps={row['num_warps']} stages={row['num_stages']}"
        if not row["smem_ok"]:
            problems.append(f"shared memory {row['shared']} > {row['smem_limit']}: {label} (fallback tile taken)")
        if row["spill_stores"] is None:
            problems.append(f"no ptxas report: {label}")
        elif (row["spill_stores"] or row["spill_loads"]) and not spills_allowed(row["arch"]):
            problems.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes: {label} regs={row['regs']}")
    return problems


def spills_allowed(arch):
    """sm_86/89-class GPUs (99 KB of shared memory) get the smallest tiles and are held to the shared
    memory limit only: their spills are reported in the summary, not counted as problems."""
    from .ops.configs import arch_class

    return arch_class(arch) == "sm86"


def summary(result):
    rows = result["variants"]
    fitted = [r for r in rows if r["smem_ok"]]
    return dict(arch=result["arch"], variants=len(rows), launched=len(fitted),
                max_shared=max((r["shared"] for r in fitted), default=0),
                smem_limit=rows[0]["smem_limit"] if rows else None,
                max_regs=max((r["regs"] or 0 for r in rows), default=0),
                spill_bytes=sum((r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in rows),
                problems=len(failures(result)))


def table_kernel(row):
    """(table kernel, precision class) that a compiled row came from; None for the delta kernel."""
    case = row["cases"][0]
    precision = {"fp32-ieee": "ieee", "fp32-tf32": "tf32"}.get(case["dtype"], "16bit")
    shape = next((s for s in SHAPES_FULL if s[0] == case["case"]), None)
    long = shape is not None and shape[3] >= 1024 and shape[4] >= 1024
    if row["kernel"] == "_fwd_kernel":
        return ("fwd1" if row["ONE_KEY_BLOCK"] else "fwd_long" if long else "fwd"), precision
    if row["kernel"] == "_bwd_dkdv_kernel":
        return ("bwd1" if row["FUSED_DQ"] else "dkdv_long" if long else "dkdv"), precision
    if row["kernel"] == "_bwd_dq_kernel":
        return ("dq_long" if long else "dq"), precision
    return None  # the delta and split-sum kernels: fixed small tiles


def matches_table(row):
    """Whether the tile table (or a measured winner) as it stands now picks this row's tile (first
    choice), so that a result file cannot silently describe tiles the code no longer launches."""
    from .ops import configs

    if row["kernel"] == "_sum_splits_kernel":
        from .ops.cross_attention import sum_block_n

        return row["BLOCK_N"] == sum_block_n(row["BLOCK_D"])
    kind = table_kernel(row)
    if kind is None:
        return True
    arch = configs.arch_class(row["arch"])
    for tuned in (False, True):  # the table's tile, or a measured winner (configs.TUNED)
        tile = configs.table_tile(kind[0], kind[1], row["BLOCK_D"], arch, tuned=tuned)
        if tile is None:
            continue
        block_n_ok = tile.block_n == 0 or tile.block_n == row["BLOCK_N"]
        if (tile.block_m, tile.num_warps, tile.num_stages) == (row["BLOCK_M"], row["num_warps"],
                                                                row["num_stages"]) and block_n_ok:
            return True
    return False


def merge(parts, subset):
    """One result per target from several worker files (e.g. a run split by shapes, or interrupted):
    variants deduplicated, complete when every (masks, shape, dtype) case of the subset was done."""
    expected = {f"{m}/{shape[0]}/{d}" for m in (MASKS_FULL if subset == "full" else MASKS_CI)
                for shape in (SHAPES_FULL if subset == "full" else SHAPES_CI)
                for d in (DTYPES_FULL if subset == "full" else DTYPES_CI)}
    merged = {}
    for part in parts:
        result = merged.setdefault(part["arch"], dict(arch=part["arch"], variants={}, errors=[], cases_done=[]))
        for row in part["variants"]:
            key = json.dumps({k: v for k, v in row.items() if k != "cases"}, sort_keys=True)
            result["variants"].setdefault(key, dict(row, cases=[]))["cases"].extend(row["cases"])
        result["errors"] += part["errors"]
        # a part's rows compiled before a table change: its cases count as not done (by this part)
        stale_cases = {f"{c['masks']}/{c['case']}/{c['dtype']}" for r in part["variants"] if not matches_table(r)
                       for c in r["cases"]}
        result["cases_done"] += [c for c in part["cases_done"] if c not in result["cases_done"] + list(stale_cases)]
    for result in merged.values():
        rows = list(result["variants"].values())
        result["variants"] = [r for r in rows if matches_table(r)]
        result["superseded_rows"] = len(rows) - len(result["variants"])
        missing = sorted(expected - set(result["cases_done"]))
        result.update(complete=not missing, cases_missing=missing)
    return [merged[arch] for arch in sorted(merged, reverse=True)]


def report(results, json_path, subset):
    """Prints one line per target and every problem; writes the JSON; returns the exit status."""
    status = 0
    for result in results:
        s = summary(result)
        print(f"sm_{s['arch']}: {s['variants']} variants, max shared {s['max_shared']} / {s['smem_limit']} B, "
              f"max regs {s['max_regs']}, spill bytes {s['spill_bytes']}, problems {s['problems']}")
        for problem in failures(result):
            print("  ", problem)
            status = 1
    if json_path:
        import triton

        payload = dict(triton=triton.__version__, subset=subset, summary=[summary(r) for r in results],
                       results=results)
        if "{arch}" in str(json_path):
            for result in results:
                _write_json(str(json_path).format(arch=result["arch"]),
                            dict(payload, summary=[summary(result)], results=[result]))
        else:
            _write_json(json_path, payload)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fmn_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCH_SM_COUNT),
                        help="target compute capability, e.g. 90 (H100/H200), 80 (A100), 86 (RTX 30xx); repeat")
    parser.add_argument("--subset", choices=("full", "ci"), default="full",
                        help="full: every shape, dtype, mask set and gradient mode; ci: a representative few")
    parser.add_argument("--json", type=Path, help="write all variants' rows here (one JSON per target if given a "
                        "pattern containing {arch})")
    parser.add_argument("--shapes", help="comma-separated shape names to keep (default: the subset's)")
    parser.add_argument("--dtypes", help=f"comma-separated, of {','.join(DTYPES_FULL)} (default: the subset's)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="WORKER_JSON",
                        help="no compiling: merge and check worker files of an earlier (split or interrupted) run")
    parser.add_argument("--skip-done", type=Path, metavar="JSON",
                        help="resume: skip the cases that this earlier (merged) result file lists as done")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = args.arch or [90, 80]
    skip = set()
    if args.skip_done:
        for result in json.loads(args.skip_done.read_text())["results"]:
            skip |= {f"sm{result['arch']}:{c}" for c in result["cases_done"]}
    if args.worker:
        prefix = f"sm{archs[0]}:"
        worker(archs[0], args.subset, args.json, args.shapes, args.dtypes,
               {c[len(prefix):] for c in skip if c.startswith(prefix)})
        return 0
    if args.merge:
        parts = []
        for path in args.merge:  # worker files, or result files written by this command
            payload = json.loads(path.read_text())
            parts += payload["results"] if "results" in payload else [payload]
        return report(merge(parts, args.subset), args.json, args.subset)
    if _ptxas_path() is None:
        print("ptxas not found in triton's nvidia backend: cannot compile ahead of time", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="fmn-aot-") as tmp:
        procs = []
        for arch in archs:  # one process per target, run side by side
            part = Path(tmp) / f"sm{arch}.json"
            cmd = [sys.executable, "-m", "fmn_kernels.aot", "--worker", "--arch", str(arch),
                   "--subset", args.subset, "--json", str(part)]
            cmd += ["--shapes", args.shapes] if args.shapes else []
            cmd += ["--dtypes", args.dtypes] if args.dtypes else []
            cmd += ["--skip-done", str(args.skip_done)] if args.skip_done else []
            procs.append((arch, part, subprocess.Popen(cmd)))
        for arch, part, proc in procs:
            if proc.wait() != 0 or not part.exists():
                print(f"sm_{arch}: compile worker failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(part.read_text()))
    return report(results, args.json, args.subset)


if __name__ == "__main__":
    sys.exit(main())
