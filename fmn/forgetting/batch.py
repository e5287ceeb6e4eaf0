"""Many concepts, one patch each: `forget_each(pipe, concepts, out_dir)` and
`fmn forget --concepts-file FILE --out-dir DIR`.

Each group (a concept, or concepts forgotten together: one line of the file, comma-joined) is
forgotten alone, into DIR/<slug>.safetensors (slug: the group's words, lower case, a-z 0-9 and "-",
groups joined by "+"; two groups with the same slug are refused). The pipeline is loaded once per
process and given back unchanged after each run; a group's reference images are drawn once. Under an
accelerate launch or torchrun, process r of W runs the pending groups r, r + W, ... on its own (no
gradient sync). A patch already in DIR is skipped (resume; force=True redoes it). A failed group is
recorded and the others go on. At the end DIR/summary.json (and a table: concept, seconds, loss
before / after, patch size, status) is written by the main process.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import unicodedata
from pathlib import Path

SUMMARY = "summary.json"
FORMAT = "fmn.forget_each/1"
MAX_SLUG = 80
_RESERVED = {"con", "prn", "aux", "nul", "summary"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


# ----------------------------------------------------------------------------- groups and names
def read_concepts_file(path) -> list[list[str]]:
    """The groups of a concepts file: one concept or a comma-joined group per line; blank lines and
    lines starting with # are ignored. ValueError naming the file and line for an empty concept."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--concepts-file {path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--concepts-file {path}: cannot read it ({e})") from None
    groups = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        group = [c.strip() for c in line.split(",")]
        if not all(group):
            raise ValueError(f"{path}:{n}: an empty concept in {line!r} (expected 'concept' or 'a, b, ...')")
        groups.append(group)
    if not groups:
        raise ValueError(f"--concepts-file {path}: no concepts (one concept or a comma-joined group per line)")
    return groups


def as_groups(concepts) -> list[list[str]]:
    """forget_each's concepts: a list whose items are a phrase or a list of phrases (a group)."""
    if isinstance(concepts, str) or not isinstance(concepts, (list, tuple)) or not concepts:
        raise ValueError("concepts must be a non-empty list of phrases or lists of phrases (one patch each), "
                         f"got {concepts!r}")
    groups = []
    for item in concepts:
        group = [item] if isinstance(item, str) else item
        if not isinstance(group, (list, tuple)) or not group or not all(isinstance(c, str) and c.strip()
                                                                       for c in group):
            raise ValueError(f"each item of concepts must be a phrase or a non-empty list of phrases, got {item!r}")
        groups.append([c.strip() for c in group])
    return groups


def slug(group) -> str:
    """A file name stem for a group: its words in lower-case ASCII letters and digits joined by "-",
    concepts by "+"; a concept with none of those (or a long name) gets a hash of the group."""
    parts = []
    for c in group:
        ascii_c = unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode()
        parts.append(re.sub(r"[^a-z0-9]+", "-", ascii_c.lower()).strip("-"))
    name = "+".join(parts)
    digest = hashlib.sha1("\n".join(group).encode()).hexdigest()[:8]
    if not all(parts) or len(name) > MAX_SLUG:
        name = f"{name[:MAX_SLUG - 9].strip('-+')}-{digest}".lstrip("-")
    return name + "-" if name in _RESERVED else name


def patch_names(groups) -> list[str]:
    """The groups' patch file names; ValueError naming both groups when two share one."""
    seen, names = {}, []
    for group in groups:
        name = slug(group) + ".safetensors"
        if name in seen:
            raise ValueError(f"concepts {seen[name]} and {group} would both be written to {name}: "
                             "give each group once, in distinct words")
        seen[name] = group
        names.append(name)
    return names


# ----------------------------------------------------------------------------- one group
def _record(group, name, status, process, seconds=None, summary=None, size=None, error=None) -> dict:
    summary = summary or {}
    return {"concepts": list(group), "file": name, "status": status, "process": process,
            "seconds": None if seconds is None else round(seconds, 3),
            "loss_before": summary.get("loss_before"), "loss_after": summary.get("loss_after"),
            "patch_bytes": size, "error": error}


def existing(group, path: Path, process: int) -> dict:
    """The record of a patch already at path: skipped if it is a patch of this group, else failed."""
    from fmn.patches.patch import load_patch
    try:
        patch = load_patch(path)
    except Exception as e:
        return _record(group, path.name, "failed", process,
                       error=f"{path} exists but is not a readable patch ({one_line(e)}); remove it or pass --force")
    if list(patch.concepts) != list(group):
        return _record(group, path.name, "failed", process,
                       error=f"{path} holds a patch for {patch.concepts}, not {group}; remove it or pass --force")
    return _record(group, path.name, "skipped", process, patch.summary.get("seconds_total"), patch.summary,
                   path.stat().st_size)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def run_group(pipe, group, path: Path, images, process, compress_args, options) -> dict:
    """Forgets one group into path (atomically); its record, failed with the error's line on any Exception."""
    from fmn.forgetting import trainer
    t0 = time.perf_counter()
    try:
        patch = trainer.forget(pipe, group, images, **{**options, "data_parallel": False})
        patch.validate()
        if any(v is not None for v in compress_args.values()):
            from fmn.patches.compress import compress
            patch = compress(patch, **compress_args)
            patch.validate()
        patch.save(path, force=True)
    except Exception as e:
        return _record(group, path.name, "failed", process, time.perf_counter() - t0, error=one_line(e))
    return _record(group, path.name, "done", process, time.perf_counter() - t0, patch.summary,
                   path.stat().st_size)


def check_groups(pipe, groups, options) -> None:
    """Bad input refused before any work: the options with each group's model defaults, the groups."""
    from fmn.families import family_for
    from fmn.forgetting.options import ForgetOptions
    from fmn.forgetting.trainer import checked_concepts
    family = family_for(pipe)
    for group in groups:
        try:
            opts = ForgetOptions(**{**family.default_options(group, options), **options})
            checked_concepts(group, opts)
        except ValueError as e:
            raise ValueError(f"concepts {group}: {e}") from None


# ----------------------------------------------------------------------------- all groups
def forget_each(pipe, concepts, out_dir, images=None, **kwargs) -> dict:
    """Forgets each item of `concepts` (a phrase, or a list of phrases forgotten together) alone, into
    out_dir/<slug>.safetensors; returns the summary also written to out_dir/summary.json.

    Under an accelerate launch or torchrun, every process calls it with the same arguments and runs
    every W-th pending group (no gradient sync); each gets the whole summary back. Patches already in
    out_dir are skipped unless force. A group that fails is recorded (status "failed", its error) and
    the others go on: check summary["failed"]. patch_rank / patch_rel_error: low-rank patches
    (fmn.patches.compress). report(record): called in the process that ran a group, when it is done.
    **options: as fmn.forget's, over the model's defaults for each group.
    """
    return run_each(lambda: pipe, concepts, out_dir, images, **kwargs)


def run_each(load, concepts, out_dir, images=None, *, force=False, patch_rank=None, patch_rel_error=None,
             report=None, **options) -> dict:
    """forget_each with the pipeline from load(), called only if this process has a group to run (a
    resume with every patch there loads nothing)."""
    from fmn.forgetting.distributed import broadcast, gather, side_group
    from fmn.patches.patch import atomic_write
    from fmn.forgetting.runtime import accelerator
    t0 = time.perf_counter()
    groups = as_groups(concepts)
    names = patch_names(groups)
    if patch_rank is not None and patch_rel_error is not None:
        raise ValueError("patch_rank and patch_rel_error: give one of them, not both")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is not a folder")
    accel = accelerator()
    rank, world, channel = accel.process_index, accel.num_processes, side_group(accel)
    # the main process decides what is pending, before anyone writes: every process works on the same list
    skipped = None if rank else {i: existing(g, out_dir / n, 0) for i, (g, n) in enumerate(zip(groups, names))
                                 if (out_dir / n).exists() and not force}
    skipped = broadcast(skipped, channel)
    pending = [i for i in range(len(groups)) if i not in skipped]
    mine = {}
    if pending[rank::world]:
        pipe = load()
        check_groups(pipe, [groups[i] for i in pending], options)
    for i in pending[rank::world]:
        mine[i] = run_group(pipe, groups[i], out_dir / names[i], images, rank,
                            {"rank": patch_rank, "rel_error": patch_rel_error}, options)
        if report is not None:
            report(mine[i])
    results = dict(skipped)
    for part in gather(mine, channel):
        results.update(part)
    records = [results[i] for i in range(len(groups))]
    summary = {"format": FORMAT, "out_dir": str(out_dir), "processes": world,
               "seconds_wall": round(time.perf_counter() - t0, 3),
               "done": sum(r["status"] == "done" for r in records),
               "skipped": sum(r["status"] == "skipped" for r in records),
               "failed": [", ".join(r["concepts"]) for r in records if r["status"] == "failed"],
               "options": json.loads(json.dumps(options, default=str)), "results": records}
    if rank == 0:
        text = json.dumps(summary, indent=1) + "\n"
        atomic_write(out_dir / SUMMARY, lambda tmp: Path(tmp).write_text(text), force=True)
    return summary


def format_table(summary) -> str:
    """The summary as a table: concept, status, seconds, loss before -> after, patch size, process."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    rows = [("concept", "status", "seconds", "loss before", "loss after", "patch KiB", "process")]
    for r in summary["results"]:
        rows.append((", ".join(r["concepts"]), r["status"], num(r["seconds"], ".2f"), num(r["loss_before"], ".4g"),
                     num(r["loss_after"], ".4g"),
                     num(None if r["patch_bytes"] is None else r["patch_bytes"] / 1024, ".1f"), str(r["process"])))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.append(f"{summary['done']} done, {summary['skipped']} skipped, {len(summary['failed'])} failed, "
                 f"{summary['processes']} process(es), {summary['seconds_wall']:.1f} s -> "
                 f"{Path(summary['out_dir']) / SUMMARY}")
    for r in summary["results"]:
        if r["status"] == "failed":
            lines.append(f"failed: {', '.join(r['concepts'])}: {r['error']}")
    return "\n".join(lines)


def report_line(world):
    """A report(record) for forget_each that prints one line per finished group."""
    def report(r):
        who = f"[process {r['process']}/{world}] " if world > 1 else ""
        what = (f"done in {r['seconds']:.2f} s, {r['patch_bytes'] / 1024:.1f} KiB -> {r['file']}"
                if r["status"] == "done" else f"failed: {r['error']}")
        print(f"{who}{', '.join(r['concepts'])}: {what}", flush=True)
    return report


# ----------------------------------------------------------------------------- the command line
def cmd_forget_each(a, given: dict, load_pipeline) -> int:
    """`fmn forget --concepts-file FILE --out-dir DIR [options]` (a: fmn.cli's arguments, given: the
    options it set, load_pipeline(): the model): exit 0 if every group is done or skipped, 1 if any
    failed (named on stderr by the main process); bad input is a ValueError (fmn.cli: exit 2)."""
    from fmn.forgetting.concepts import check_concepts
    from fmn.forgetting.options import ForgetError
    from fmn.cli.outputs import check_output
    from fmn.forgetting.runtime import accelerator
    if a.concepts_file is None or a.out_dir is None:
        raise ValueError("--concepts-file and --out-dir go together (one patch per line of the file, in the folder)")
    for flag, value in (("--concept", a.concept), ("--out", a.out), ("--grid", a.grid),
                        ("--grid-prompt", a.grid_prompt)):
        if value:
            raise ValueError(f"{flag} does not go with --concepts-file (each group's patch goes to --out-dir)")
    if a.patch_rank and a.patch_rel_error:
        raise ValueError("--patch-rank and --patch-rel-error: give one of them, not both")
    groups = read_concepts_file(a.concepts_file)
    patch_names(groups)
    check_output(a.out_dir, True, folder=True, what="--out-dir")
    if a.images is not None and not Path(a.images).is_dir():
        raise ValueError(f"--images {a.images}: {'no such folder' if not Path(a.images).exists() else 'not a folder'}")
    accel = accelerator()

    def load():  # only if this process has a group to run: a resume with all patches there loads nothing
        pipe = load_pipeline()
        messages = check_concepts(pipe, [c for g in groups for c in g])
        if messages and a.strict:
            raise ValueError(messages[0] + (f" (and {len(messages) - 1} more)" if len(messages) > 1 else "")
                           + " (--strict)")
        if accel.is_main_process:
            for msg in messages:
                print(f"fmn: warning: {msg}", file=sys.stderr)
        return pipe

    summary = run_each(load, groups, a.out_dir, a.images, force=a.force, patch_rank=a.patch_rank,
                       patch_rel_error=a.patch_rel_error,
                       report=None if a.quiet else report_line(accel.num_processes), **given)
    if not accel.is_main_process:
        return 1 if summary["failed"] else 0
    if not a.quiet:
        print(format_table(summary))
    if summary["failed"]:
        raise ForgetError(f"{len(summary['failed'])} of {len(groups)} failed: "
                          + "; ".join(f"{', '.join(r['concepts'])} ({r['error']})"
                                      for r in summary["results"] if r["status"] == "failed"))
    return 0
