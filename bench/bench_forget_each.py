"""`fmn forget --concepts-file` on the ten toy concepts (5 shapes, 5 colours), one patch each, spread over
1 and N processes (torchrun, gloo on the CPU): wall time of the launch, of its resume (every patch
skipped), the per-concept seconds, and whether each patch is bit-identical to a single-concept
`fmn forget` run with the same options (same thread count).

    python bench/bench_forget_each.py                        # the toy's defaults (closed-form edit)
    python bench/bench_forget_each.py --method attention     # the attention-loss rule, --steps 20 per concept

Writes bench/results/forget_each_toy_<method>_cpu.json (+ .png); a variant that fails is recorded, not fatal.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, print_table, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"closed-form": [], "attention": ["--no-closed-form", "--steps", "20"]}


def fmn(args, processes, threads):
    """Wall seconds and the CompletedProcess of `fmn ARGS` in `processes` processes of `threads` threads."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "fmn"] \
        if processes > 1 else ["-m", "fmn"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *launch, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0, r


def identical(out_dir, groups, options, threads) -> dict:
    """{concept: whether out_dir's patch equals a single-concept run's, tensor for tensor}."""
    import torch

    from fmn.forgetting.batch import patch_names
    from fmn.patches.patch import load_patch
    result = {}
    for group, name in zip(groups, patch_names(groups)):
        single = Path(out_dir).parent / "single.safetensors"
        _, r = fmn(["forget", "--out", str(single), "--force", "-q", *options,
                    *[x for c in group for x in ("--concept", c)]], 1, threads)
        if r.returncode:
            result[", ".join(group)] = f"single run failed: {r.stderr.strip().splitlines()[-1]}"
            continue
        a, b = load_patch(Path(out_dir) / name), load_patch(single)
        result[", ".join(group)] = a.tensors.keys() == b.tensors.keys() and all(
            torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
    return result


def plot(runs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['processes']} process(es)" for r in runs]
    ax.bar(range(len(runs)), [r.get("wall_s") or 0 for r in runs], color="tab:blue", label="launch")
    ax.bar(range(len(runs)), [r.get("resume_wall_s") or 0 for r in runs], color="tab:orange", width=0.4,
           label="resume (all skipped)")
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylabel("wall s")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=list(METHODS), default="closed-form")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from fmn.toy import COLORS, SHAPES
    groups = [[c] for c in SHAPES + COLORS]
    options = METHODS[a.method]
    out = a.out or RESULTS / f"forget_each_toy_{a.method}_cpu.json"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        concepts = Path(tmp) / "concepts.txt"
        concepts.write_text("# the toy model's ten concepts\n" + "\n".join(g[0] for g in groups) + "\n")
        for n in a.processes:
            out_dir = Path(tmp) / f"patches-{n}"
            args = ["forget", "--concepts-file", str(concepts), "--out-dir", str(out_dir), "-q", *options]
            run = {"processes": n, "threads_per_process": a.threads, "load_average_before": os.getloadavg(),
                   "command": " ".join(["torchrun --standalone --nproc_per_node", str(n)] if n > 1 else [])
                   + " python -m fmn " + " ".join(args)}
            wall, r = fmn(args, n, a.threads)
            run.update(wall_s=round(wall, 2), returncode=r.returncode)
            if r.returncode == 0:
                run["summary"] = json.loads((out_dir / "summary.json").read_text())
                run["resume_wall_s"] = round(fmn(args, n, a.threads)[0], 2)
                run["resume_skipped"] = json.loads((out_dir / "summary.json").read_text())["skipped"]
                if n == max(a.processes):
                    run["identical_to_single_runs"] = identical(out_dir, groups, options, a.threads)
            else:
                run["error"] = r.stderr.strip().splitlines()[-5:]
            runs.append(run)
            print_table([{"processes": n, "wall_s": run["wall_s"], "resume_wall_s": run.get("resume_wall_s"),
                          "rc": r.returncode}], ["processes", "wall_s", "resume_wall_s", "rc"])
    payload = {"bench": "forget_each", "model": "fmn-toy", "method": a.method, "options": options,
               "concepts": [g[0] for g in groups], "machine": machine_info(), "runs": runs}
    write_json_atomic(out, payload)
    plot(runs, out.with_suffix(".png"), f"fmn forget --concepts-file, 10 toy concepts, {a.method}, CPU")
    for run in runs:
        if "summary" in run:
            from fmn.forgetting.batch import format_table
            print(f"\n{run['processes']} process(es): {run['wall_s']} s wall")
            print(format_table(run["summary"]))
        if "identical_to_single_runs" in run:
            print("identical to single-concept runs:", run["identical_to_single_runs"])
    print(f"-> {out}")


if __name__ == "__main__":
    main()
