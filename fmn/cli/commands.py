"""`fmn` command line: forget, apply, generate, info.

    fmn forget   --model PATH_OR_HUB_ID --concept TEXT [--concept TEXT ...] [--images DIR] --out PATCH.safetensors
    fmn forget   --model PATH_OR_HUB_ID --concepts-file FILE --out-dir DIR   (one patch per line: fmn.forgetting.batch)
    fmn apply    --model PATH_OR_HUB_ID --patch PATCH.safetensors --out DIR
    fmn generate --model PATH_OR_HUB_ID [--patch PATCH.safetensors] --prompt TEXT [...] --out grid.png [--compare]
    fmn eval     [--model toy|toy-mmdit|PATH] [--patch PATCH.safetensors] --forget SHAPE_OR_COLOUR --out M.json
    fmn info     PATCH.safetensors [--json]
    fmn export   PATCH.safetensors --format diffusers|kohya --out LORA.safetensors [--rank R]

Without --model the built-in toy model (fmn.toy) is used; --model toy names it, --model toy-mmdit the
built-in MM-DiT (SD3-structured) toy model. Exit status: 0 done, 1 the run failed
(e.g. a non-finite loss), 2 bad input (one line "fmn: error: ..."; --debug shows the traceback),
130 interrupted. Outputs are checked before any work starts and written together at the end:
nothing is written unless the command completes, and an existing output is refused without --force.
Also runs as `python -m fmn` and under `accelerate launch -m fmn forget ...` or torchrun: data parallel
(fmn.distributed; the main process writes), or with --concepts-file the lines spread over the processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fmn.forgetting.options import BACKENDS, LOSSES, PATCH_DTYPES, PRECISIONS, TRAIN_SETS

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class CLIError(Exception):
    """Bad input: printed as 'fmn: error: ...', exit status 2."""


# ----------------------------------------------------------------------------- helpers
def _default_model() -> str:
    try:
        from fmn.toy import default_model_path
    except ImportError as e:
        raise CLIError("no --model given, and the built-in default model is not available in this install "
                       f"(fmn.toy: {e}); pass --model PATH_OR_HUB_ID") from None
    path = Path(default_model_path())
    if not (path / "model_index.json").is_file():
        raise CLIError(f"no --model given, and the built-in default model is missing from this install ({path}); "
                       "pass --model PATH_OR_HUB_ID")
    return str(path)


def _device(name):
    import torch
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r}: not a torch device (expected cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {name}: fmn runs on cpu, cuda or mps")
    return dev


def _built_in_name(model) -> str | None:
    """The built-in toy model that `model` names ("toy", "toy-mmdit"; None: the default "toy"), or None
    for a folder or hub id. A folder that happens to be called "toy" is reached as ./toy."""
    if model is None:
        return "toy"
    try:
        from fmn.toy.paths import MODELS
    except ImportError:
        return None
    return model if model in MODELS else None


def _load_built_in(name, precision, device):
    """A built-in toy pipeline through fmn.toy.load_pipeline, with the CLI's errors."""
    try:
        from fmn.toy import load_pipeline as load_toy
        from fmn.toy import model_path
    except ImportError as e:
        raise CLIError(f"--model {name}: the built-in toy models are not available in this install ({e})") from None
    if not (Path(model_path(name)) / "model_index.json").is_file():
        raise CLIError(f"--model {name}: the built-in model is missing from this install ({model_path(name)}); "
                       "pass --model PATH_OR_HUB_ID")
    pipe = load_toy(name, device=_device(device), dtype=PRECISIONS[precision])
    pipe.set_progress_bar_config(disable=False)  # as any other model's (fmn.toy turns it off)
    return pipe


def model_label(model) -> str:
    """How a patch and an eval record name the model: "fmn-toy", "fmn-toy-mmdit", or the path / hub id."""
    name = _built_in_name(model)
    return f"fmn-{name}" if name else model


def load_pipeline(model, precision="fp32", *, for_training=False, device=None):
    """A diffusers pipeline from a folder or hub id, with clear errors; None, "toy" or "toy-mmdit": the
    built-in toy model of that name (fmn.toy.load_pipeline)."""
    from diffusers import DiffusionPipeline
    if model is None:
        _default_model()  # its clear error in an install without the toy model
    if _built_in_name(model):
        return _load_built_in(_built_in_name(model), precision, device)
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1
    if looks_local:
        if not path.exists():
            raise CLIError(f"model folder {model} does not exist")
        if not path.is_dir():
            raise CLIError(f"model {model} is not a folder "
                           "(expected a diffusers pipeline folder with model_index.json)")
        if not (path / "model_index.json").is_file():
            raise CLIError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        model = str(path)
    import diffusers.utils.deprecation_utils as dep
    # diffusers renamed torch_dtype to dtype (0.36+); older versions only know torch_dtype
    dtype_kw = "dtype" if hasattr(dep, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    kwargs = {dtype_kw: PRECISIONS[precision]}
    if for_training:
        try:
            cfg = DiffusionPipeline.load_config(model)
            if "safety_checker" in cfg:  # not used for training: do not load it
                kwargs.update(safety_checker=None, requires_safety_checker=False)
        except Exception:
            pass
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot load model {model!r}: {msg}") from None
    from fmn.processors.mmdit_attention import is_mmdit
    if not (hasattr(pipe, "unet") or is_mmdit(pipe)) or getattr(pipe, "text_encoder", None) is None:
        raise CLIError(f"{model} loads as {type(pipe).__name__}, "
                       "not a Stable Diffusion 1.x/2.x/XL, SD3 or FLUX pipeline")
    pipe.to(_device(device))
    return pipe


def _outputs(a, *names, folder=()):
    """Checks every output option in `names` up front (see fmn.cli.outputs.check_output)."""
    from fmn.cli.outputs import check_output
    paths = [getattr(a, n) for n in names if getattr(a, n, None)]
    if len({str(Path(p).resolve()) for p in paths}) < len(paths):
        raise CLIError(f"the outputs {paths} must be different paths")
    for n in names:
        if getattr(a, n, None):
            check_output(getattr(a, n), a.force, folder=n in folder, what="--" + n.replace("_", "-"))


def _write_png(image):
    return lambda tmp: image.save(tmp, format="PNG")


def format_summary(patch, path=None) -> str:
    s = patch.summary
    mem = s.get("peak_memory_bytes")
    mem = f"{mem / 2**30:.2f} GiB (CUDA)" if mem else f"{s.get('peak_rss_bytes', 0) / 2**30:.2f} GiB (process RSS)"
    size = Path(path).stat().st_size if path and Path(path).exists() else patch.nbytes
    lines = [
        f"concepts      {', '.join(patch.concepts)}",
        f"time          {s['seconds_total']:.2f} s total, {s.get('seconds_train', 0.0):.2f} s for {s['steps']} steps "
        f"(batch {s['batch_size']}, {s['device']})",
        f"peak memory   {mem}",
        f"patch         {patch.kind}, {len(patch.tensors)} tensors, {size / 2**20:.2f} MiB"
        + (f" -> {path}" if path else ""),
    ]
    if "loss_before" in s:
        lines.insert(3, f"loss          {s['loss_before']:.5g} -> {s['loss_after']:.5g}"
                     + "".join(f", {k} {s[k + '_losses'][0]:.3g} -> {s[k + '_loss_after']:.3g}"
                               for k in ("retain", "anchor") if s.get(k + "_losses")))
    if "seconds_closed_form" in s:
        lines.insert(2, f"closed form   {s['closed_form_layers']} layers in {s['seconds_closed_form']:.2f} s")
    if s.get("inverted_tokens"):
        lines.insert(1, f"inverted as   {s['inverted_tokens']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands
def given_options(a) -> dict:
    """The forget options the command line set (None: unset, left to the model's defaults)."""
    template = a.template
    if template is not None and len(template) == 1 and template[0] in ("object", "style"):
        template = template[0]
    given = dict(
        steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed, resolution=a.resolution,
        train=a.train, loss=a.loss, visual_weight=a.visual_weight, template=template, n_images=a.n_images,
        gen_steps=a.gen_steps, include_eos=a.include_eos, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
        retain=a.retain, retain_weight=a.retain_weight, retain_samples=a.retain_samples,
        retain_images=a.retain_images, anchor=_anchor_arg(a.anchor), anchor_weight=a.anchor_weight,
        precision=a.precision, gradient_checkpointing=a.gradient_checkpointing, backend=a.backend,
        closed_form=a.closed_form, preserve_weight=a.preserve_weight, preserve_base=a.preserve_base,
        closed_form_rounds=a.closed_form_rounds,
        inversion=a.inversion, inversion_steps=a.inversion_steps, inversion_tokens=a.inversion_tokens,
        patch_dtype=a.patch_dtype, max_grad_norm=a.max_grad_norm, device=a.device,
        cuda_graphs=False if a.no_cuda_graphs else None,
        progress=not a.quiet, base_model=model_label(a.model))
    return {k: v for k, v in given.items() if v is not None}


def cmd_forget(a):
    t_start = time.perf_counter()
    from fmn.families import family_for
    from fmn.forgetting.options import ForgetOptions, templates
    from fmn.forgetting.runtime import accelerator
    from fmn.forgetting.trainer import forget
    if a.concepts_file is not None or a.out_dir is not None:  # many concepts, one patch each
        from fmn.forgetting.batch import cmd_forget_each
        return cmd_forget_each(a, given_options(a),
                               lambda: load_pipeline(a.model, a.precision, for_training=True, device=a.device))
    if not (a.concept or a.preset) or not a.out:
        raise CLIError("forget needs --concept and --out (or --preset and --out, or --concepts-file and --out-dir)")
    from fmn.forgetting.presets import load_detector, resolve
    try:  # --preset: its phrases and templates (refused without --images if it needs them); --eval-detector
        a.concept, a.template = resolve(a.preset, a.concept, a.template, a.images, a.loss)
        detector = load_detector(a.eval_detector) if a.eval_detector else None
    except ValueError as e:
        raise CLIError(str(e)) from None
    _outputs(a, "out", "grid")
    if a.images is not None:
        images = Path(a.images)
        if not images.is_dir():
            raise CLIError(f"--images {a.images}: {'no such folder' if not images.exists() else 'not a folder'}")
    else:
        images = None
    given = given_options(a)
    if a.patch_rank and a.patch_rel_error:
        raise CLIError("--patch-rank and --patch-rel-error: give one of them, not both")
    try:  # checked before the (slow) pipeline load; --steps 0 waits for the model's defaults (the toys' closed form)
        ForgetOptions(**{**given, **({"closed_form": True} if given.get("steps") == 0 and "closed_form" not in given
                                     else {})})
    except ValueError as e:
        raise CLIError(str(e)) from None
    t_load = time.perf_counter()
    pipe = load_pipeline(a.model, a.precision, for_training=True, device=a.device)
    seconds = {"load": time.perf_counter() - t_load}
    # the model family's defaults (the built-in toy model's tuned ones), under what was given: as fmn.forget
    try:
        opts = ForgetOptions(**{**family_for(pipe).default_options(a.concept, given), **given})
    except ValueError as e:
        raise CLIError(str(e)) from None
    from fmn.forgetting.concepts import check_concepts
    for msg in check_concepts(pipe, a.concept):
        if a.strict:
            raise CLIError(msg + " (--strict)")
        if accelerator().is_main_process:
            print(f"fmn: warning: {msg}", file=sys.stderr)
    patch = forget(pipe, a.concept, images, options=opts)
    # under a launch: every process finished its part (a failed one stops the launch before this), then
    # the main process alone checks, draws and writes
    accelerator().wait_for_everyone()
    if not accelerator().is_main_process:
        return 0
    patch.validate()
    if a.patch_rank or a.patch_rel_error:  # low-rank factor pairs; the grid shows what is saved
        from fmn.patches.compress import compress
        patch = compress(patch, rank=a.patch_rank, rel_error=a.patch_rel_error)
        patch.validate()
    if detector is not None:  # before the grid, which leaves the pipeline patched
        from fmn.forgetting.presets import detector_report
        patch.summary["detector"] = detector_report(
            pipe, patch, [t.format(c) for c in a.concept for t in templates(opts.template)], detector,
            n=a.eval_images, steps=opts.gen_steps, guidance_scale=opts.guidance_scale, seed=a.seed,
            resolution=patch.summary.get("resolution"), threshold=a.eval_threshold)
    outputs = [(a.out, lambda tmp: patch.save(tmp, force=True), False)]
    if a.grid:  # drawn before anything is written: an interrupt here leaves no patch behind
        prompts = a.grid_prompt or [templates(opts.template)[0].format(c) for c in a.concept] + _retain_prompts(a)
        pipe.set_progress_bar_config(disable=True)
        steps = a.grid_steps or opts.gen_steps
        guidance = a.grid_guidance_scale or opts.guidance_scale
        t_grid = time.perf_counter()
        grid = _compare_grid(pipe, patch, prompts, 4, steps, guidance, a.seed, a.resolution, quiet=a.quiet)
        seconds["grid"] = time.perf_counter() - t_grid
        outputs.append((a.grid, _write_png(grid), False))
    from fmn.cli.outputs import commit
    commit(outputs, force=a.force)
    seconds["wall"] = time.perf_counter() - t_start
    if not a.quiet:
        print(format_summary(patch, a.out))
        if detector is not None:
            from fmn.forgetting.presets import format_report
            print(format_report(patch.summary["detector"]))
        if a.grid:
            print(f"grid          {a.grid}: rows {prompts}, 4 seeds base | 4 seeds patched")
        print(format_time_split(patch.summary, seconds))
    return 0


def format_time_split(summary, seconds) -> str:
    """Where the command's wall time went: loading the model, drawing reference images, training steps,
    the closed-form edit, the grid (`seconds`: load, grid, wall, measured here; the rest from the patch's
    summary); what is left (checks, writing, imports) is "other"."""
    parts = {"load": seconds.get("load", 0.0), "images": summary.get("seconds_images", 0.0),
             "steps": summary.get("seconds_train", 0.0), "closed form": summary.get("seconds_closed_form", 0.0),
             "grid": seconds.get("grid", 0.0)}
    parts["other"] = max(seconds["wall"] - sum(parts.values()), 0.0)
    return (f"time split    {seconds['wall']:.1f} s wall: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))


def _anchor_arg(values):
    """--anchor values; --anchor "" alone turns the built-in model's anchors off (an empty list)."""
    return None if values is None else [v for v in values if v.strip()]


def _retain_prompts(a) -> list:
    """For the built-in toy model: prompts the forgetting should leave alone, for the grid."""
    if _built_in_name(a.model) is None:
        return []
    from fmn.toy import SHAPES
    concepts = {c.lower() for c in a.concept}
    others = [s for s in SHAPES if s not in concepts and not any(s in c for c in concepts)]
    return [f"a blue {others[0]}", f"a yellow {others[1]}"] if len(others) >= 2 else []


def cmd_apply(a):
    from fmn.cli.outputs import commit
    from fmn.patches.patch import load_patch
    _outputs(a, "out", folder=("out",))
    patch = load_patch(a.patch)
    pipe = load_pipeline(a.model, a.precision, device=a.device)
    patch.apply(pipe)
    commit([(a.out, lambda d: pipe.save_pretrained(str(d)), True)], force=a.force)
    if not a.quiet:
        print(f"applied {patch.kind} patch for {', '.join(patch.concepts)} -> {a.out}")
    return 0


def _images(pipe, prompts, n, steps, guidance_scale, seed, resolution, quiet=True, desc="images"):
    """n images per prompt, image i of every prompt from seed + i."""
    import torch
    from tqdm.auto import tqdm
    from fmn.families import family_for
    kw = {"height": resolution, "width": resolution} if resolution else {}
    kw.update(family_for(pipe).pipeline_kwargs())  # the built-in toy-mmdit: its short T5 length
    images = []
    for prompt in tqdm(prompts, desc=desc, unit="prompt", disable=quiet or len(prompts) < 2, leave=False):
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        images += pipe(prompt=[prompt] * n, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=gens, **kw).images
    return images


def _compare_grid(pipe, patch, prompts, n, steps, guidance_scale, seed, resolution, quiet=True):
    """One row per prompt: n base images, then the same seeds with the patch applied (pipe is patched)."""
    base = _images(pipe, prompts, n, steps, guidance_scale, seed, resolution, quiet, "grid: base")
    patch.apply(pipe)
    patched = _images(pipe, prompts, n, steps, guidance_scale, seed, resolution, quiet, "grid: patched")
    from fmn.cli.grid import labelled_grid
    rows = []
    for r in range(len(prompts)):
        rows += base[r * n:(r + 1) * n] + patched[r * n:(r + 1) * n]
    cols = [f"base s{seed + i}" for i in range(n)] + [f"patched s{seed + i}" for i in range(n)]
    return labelled_grid(rows, prompts, cols)


def cmd_generate(a):
    from fmn.cli.outputs import commit
    from fmn.patches.patch import load_patch
    _outputs(a, "out")
    if a.compare and not a.patch:
        raise CLIError("--compare needs --patch")
    patch = load_patch(a.patch) if a.patch else None
    pipe = load_pipeline(a.model, a.precision, device=a.device)
    if patch is not None:
        patch.check(pipe)
    if a.quiet:
        pipe.set_progress_bar_config(disable=True)
    args = (a.n, a.steps, a.guidance_scale, a.seed, a.resolution)
    if a.compare:
        grid = _compare_grid(pipe, patch, a.prompt, *args)
    else:
        if patch is not None:
            patch.apply(pipe)
        from fmn.cli.grid import labelled_grid
        label = "patched" if patch is not None else "seed"
        grid = labelled_grid(_images(pipe, a.prompt, *args), a.prompt, [f"{label} s{a.seed + i}" for i in range(a.n)])
    commit([(a.out, _write_png(grid), False)], force=a.force)
    if not a.quiet:
        print(f"wrote {a.out} ({len(a.prompt)} prompts x {a.n} images"
              + (", base | patched" if a.compare else "") + ")")
    return 0


def cmd_eval(a):
    """Forgetting metrics on a toy-model-family pipeline (the built-in one by default), with or
    without a patch: UA, in-domain and cross-domain retain accuracy, and the base's for reference;
    with --robustness also the Memorization Score and an inversion attack's success rate."""
    import copy

    import torch
    from fmn.cli.outputs import commit
    from fmn.patches.patch import load_patch
    from fmn.toy import evaluate, load_classifier, relative_to
    from fmn.toy.data import COLORS, SHAPES
    for c in a.forget:
        if c not in SHAPES + COLORS:
            raise CLIError(f"--forget {c!r}: fmn eval scores the toy model's shapes {SHAPES} and colours {COLORS}")
    if a.robustness and not a.patch:
        raise CLIError("--robustness compares the base and the patched model: give --patch")
    if a.inversion_steps is None:
        from fmn.toy.robustness import INVERSION_STEPS
        a.inversion_steps = INVERSION_STEPS
    if a.inversion_steps < 1:
        raise CLIError(f"--inversion-steps must be >= 1, got {a.inversion_steps}")
    _outputs(a, "out", "grid")
    patch = load_patch(a.patch) if a.patch else None
    pipe = load_pipeline(a.model, a.precision, device=a.device)
    pipe.set_progress_bar_config(disable=True)
    if patch is not None:
        patch.check(pipe)
    if pipe.device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model: one thread beats two oversubscribed ones
    seeds = list(range(a.seeds))
    classifier = load_classifier()
    kw = dict(forgotten=a.forget, seeds=seeds, classifier=classifier, return_images=bool(a.grid),
              num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
    results = {"model": model_label(a.model), "patch": a.patch, "seeds": seeds}
    # diffusers' own bar shows each batch's denoising steps (a minute or more on a CPU)
    pipe.set_progress_bar_config(disable=a.quiet, desc="eval: base", leave=False)
    base = evaluate(pipe, **kw)
    panels = {"base": base.pop("images", None)}
    results["base"] = {k: v for k, v in base.items() if k not in ("specs", "predictions")}
    if patch is not None:
        base_pipe = copy.deepcopy(pipe) if a.robustness else None
        patch.apply(pipe, check=False)
        pipe.set_progress_bar_config(disable=a.quiet, desc="eval: patched", leave=False)
        after = evaluate(pipe, **kw)
        panels["patched"] = after.pop("images", None)
        results["patched"] = {k: v for k, v in after.items() if k not in ("specs", "predictions")}
        results["patched"].update(relative_to(after, base))
        if a.robustness:
            from fmn.toy.robustness import report
            results["robustness"] = report(base_pipe, pipe, a.forget, classifier, steps=a.inversion_steps,
                                           num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
    outputs = [(a.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, default=str)), False)]
    if a.grid:
        outputs.append((a.grid, _write_png(_eval_grid(panels, len(seeds))), False))
    commit(outputs, force=a.force)
    if not a.quiet:
        for name in ("base", "patched"):
            if name in results:
                r = results[name]
                print(f"{name:8s} UA {r.get('ua')}  in-domain retain {r.get('in_domain_retain')}  "
                      f"cross-domain retain {r.get('cross_domain_retain')}  "
                      f"({r['n_images']} images, {r['seconds']:.1f} s)")
        for c, r in results.get("robustness", {}).items():
            ms = r["memorization_score"]
            print(f"{c}: memorization score {ms['base']:.3f} -> {ms['patched']:.3f}; inversion attack "
                  f"({r['inversion_steps']} steps) success {r['attack_success']:.2f} "
                  f"(on base {r['attack_success_on_base']:.2f})")
        print(f"wrote {a.out}" + (f" and {a.grid}" if a.grid else ""))
    return 0


def _eval_grid(panels, n_seeds):
    """Seed 0 of every prompt: a row per shape, a column per colour, base then patched."""
    from PIL import Image

    from fmn.cli.grid import labelled_grid
    from fmn.toy.data import COLORS, SHAPES
    cells, cols = [], [f"{name} {c} s0" for name in panels for c in COLORS]
    for s_i in range(len(SHAPES)):
        for images in panels.values():
            for c_i in range(len(COLORS)):
                t = images[(s_i * len(COLORS) + c_i) * n_seeds]  # prompts are shapes outer, then seeds
                arr = ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                cells.append(Image.fromarray(arr))
    return labelled_grid(cells, list(SHAPES), cols)


def cmd_info(a):
    from fmn.patches.patch import load_patch
    p = load_patch(a.patch)
    if a.json:
        record = {"kind": p.kind, "concepts": p.concepts, "base_model": p.base_model, "fmn_version": p.version,
                  "fingerprint": p.fingerprint, "tensors": {k: [str(v.dtype).replace("torch.", ""), list(v.shape)]
                                                            for k, v in p.tensors.items()},
                  "bytes": p.nbytes, "options": p.options, "summary": p.summary}
        print(json.dumps(record, indent=2, default=str))
        return 0
    s, o = p.summary, p.options
    comp = s.get("compression")
    lines = [f"concepts      {', '.join(p.concepts)}",
             f"kind          {p.kind}, {len(p.tensors)} tensors, {p.nbytes / 2**20:.2f} MiB"
             + (f", low-rank (rank {comp['rank'] or 'auto'}, max error {comp['max_rel_error']:.3g})" if comp else ""),
             f"base model    {p.base_model or '?'} (fingerprint {p.fingerprint.get('hash')})",
             f"trained       {o.get('train', '?')}, {s.get('steps', '?')} steps, lr {o.get('lr', '?')}, "
             f"loss {o.get('loss', '?')}" + (f", {s['seconds_total']:.1f} s" if "seconds_total" in s else ""),
             f"fmn version   {p.version}",
             "(--json: the whole record)"]
    if "loss_before" in s and "loss_after" in s:
        lines.insert(4, f"loss          {s['loss_before']:.5g} -> {s['loss_after']:.5g}")
    print("\n".join(lines))
    return 0


def cmd_export(a):
    from fmn.patches.lora_export import export
    from fmn.cli.outputs import commit
    from fmn.patches.patch import load_patch
    _outputs(a, "out")
    patch = load_patch(a.patch)
    info = {}
    if a.no_bias and a.format != "kohya":
        raise CLIError("--no-bias is for --format kohya (the diffusers format holds the bias changes)")
    commit([(a.out, lambda tmp: info.update(export(patch, tmp, a.format, rank=a.rank, rel_error=a.rel_error,
                                                   force=True, bias=not a.no_bias)), False)], force=a.force)
    if info["dropped"]:
        print(f"fmn: warning: the {a.format} format cannot hold {len(info['dropped'])} changed tensors; left out: "
              + ", ".join(info["dropped"][:3]) + (" ..." if len(info["dropped"]) > 3 else ""), file=sys.stderr)
    if not a.quiet:
        print(f"wrote {a.out}: {a.format} LoRA, {info['modules']} modules, rank {info['rank_min']}-{info['rank_max']}"
              + (f", max relative error {info['max_rel_error']:.3g}" if patch.kind != "lora" or a.rank else ""))
    return 0


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with bad usage reported as one line like every other error."""

    def error(self, message):
        raise CLIError(f"{self.prog}: {message}")


def _at_least(low, kind=int):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)
POSITIVE_FLOAT = _at_least(1e-300, float)


def _unit_interval(text):
    """A relative error: a number in (0, 1)."""
    value = POSITIVE_FLOAT(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be < 1, got {text}")
    return value


def _toy_defaults_note() -> str:
    """The defaults that apply without --model: the built-in toy models' tuned values."""
    try:
        from fmn.toy import default_model_path
        from fmn.toy.defaults import ANCHOR_STEPS, FORGET_DEFAULTS, PRESERVE_WEIGHT, ROBUST
    except ImportError:
        return ""
    d = FORGET_DEFAULTS
    return (f"The defaults shown are the paper's, for --model (SD3 / FLUX.1: with the pipeline's own guidance "
            f"scale). On the built-in toy models (no --model, --model toy, --model {default_model_path()}, or "
            f"--model toy-mmdit) unset options take their tuned values, as fmn.forget does there: the attention "
            f"re-steering ({ROBUST['steps']} steps per concept at lr {ROBUST['lr']}, {d['n_images']} reference "
            f"images of {d['gen_steps']} steps, retain weight {d['retain_weight']}), each concept turned into "
            f"the next shape or colour (--anchor), the model's caption forms as templates, the other shapes or "
            f"colours kept on {ROBUST['retain_images']} images each (--retain-images); then the closed-form edit "
            f"on the trained weights (--closed-form, --preserve-weight "
            f"{PRESERVE_WEIGHT}) (fmn/toy/defaults.py). --steps 0: the closed-form edit alone. --no-closed-form: "
            f"the attention rule alone, {ANCHOR_STEPS['shape']} steps per shape ({ANCHOR_STEPS['color']} per "
            f"colour) at lr {d['lr']}; on --model toy-mmdit: " + _toy_mmdit_defaults_note())


def _toy_mmdit_defaults_note() -> str:
    from fmn.toy.mmdit_defaults import ANCHOR_STEPS, FORGET_DEFAULTS, ROBUST
    d = FORGET_DEFAULTS
    return (f"{ROBUST['steps']} steps per concept at lr {ROBUST['lr']} ({ROBUST['retain_images']} images per "
            f"retained concept) before the closed form; the rule alone "
            f"{ANCHOR_STEPS['shape']} steps per shape ({ANCHOR_STEPS['color']} per colour) at lr {d['lr']}; retain "
            f"weight {d['retain_weight']} on {d['retain_samples']} samples (fmn/toy/mmdit_defaults.py).")


def build_parser() -> argparse.ArgumentParser:
    from fmn import __version__
    ap = _Parser(prog="fmn", description="Forget-Me-Not concept forgetting for Stable Diffusion: "
                                 "fast, with small patch files.")
    ap.add_argument("--version", action="version", version=f"fmn {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, model_help="diffusers pipeline folder or hub id (SD 1.x, 2.x, SDXL, SD3, FLUX.1), or a built-in toy "
                             "model: 'toy' (UNet, the default) or 'toy-mmdit' (SD3-structured)"):
        p.add_argument("--model", default=None, help=model_help)
        p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                       help="weights/compute precision (default fp32)")
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")

    f = sub.add_parser("forget", help="train a patch that makes the model forget concepts",
                       epilog=_toy_defaults_note())
    common(f)
    f.add_argument("--concept", action="append", default=None,
                   help="concept to forget (repeat for several: forgotten together, in one patch); required "
                        "unless --preset or --concepts-file gives them")
    f.add_argument("--images", default=None,
                   help="folder of reference images (or one subfolder per concept); default: generated")
    f.add_argument("--out", default=None, help="patch file to write (.safetensors)")
    f.add_argument("--grid", default=None, help="also write a PNG of base | patched images (concept prompts, "
                   "plus prompts to keep on the built-in model)")
    f.add_argument("--grid-prompt", action="append", default=None, help="a prompt for --grid (repeat)")
    f.add_argument("--grid-steps", type=POSITIVE, default=None,
                   help="inference steps for --grid (default: --gen-steps)")
    f.add_argument("--grid-guidance-scale", type=float, default=None, help="default: the reference images' scale")
    f.add_argument("--steps", type=NON_NEGATIVE, default=None,
                   help="optimiser steps (default 35; 0 with --closed-form: the closed-form edit alone)")
    f.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="AdamW learning rate (default 2e-6; 1e-4 for --train lora)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--resolution", type=POSITIVE, default=None, help="default: from the model's config")
    f.add_argument("--batch-size", type=POSITIVE, default=1)
    f.add_argument("--train", choices=TRAIN_SETS, default="attn2")
    f.add_argument("--loss", choices=LOSSES, default="attention")
    f.add_argument("--visual-weight", type=float, default=1.0)
    f.add_argument("--template", action="append", default=None,
                   help="'object' (default), 'style', or a custom template with {} (repeat for several)")
    f.add_argument("--n-images", type=POSITIVE, default=None,
                   help="images generated per concept (default 10; 4 on tiny models)")
    f.add_argument("--gen-steps", type=POSITIVE, default=None, help="inference steps for generated images (default 30)")
    f.add_argument("--include-eos", action="store_true", help="also mark end-of-text slots (authors' use_pooler)")
    f.add_argument("--retain", action="append", default=None,
                   help="a concept to keep (repeat): the UNet's outputs on its prompts are held to the base's")
    f.add_argument("--retain-weight", type=float, default=None, help="weight of the retain loss (default 1)")
    f.add_argument("--retain-samples", type=POSITIVE, default=None,
                   help="cached noisy latents per run for the retain loss (default 32)")
    f.add_argument("--retain-images", type=NON_NEGATIVE, default=None,
                   help="images generated per retained phrase for the retain loss (default: --n-images; "
                        "0: use the forgotten concept's images)")
    f.add_argument("--anchor", action="append", default=None,
                   help="what the concept should become (repeat: one per concept): its prompts' outputs are pulled "
                        "to the base model's with the anchor in its place (Concept Ablation); \"\" for none")
    f.add_argument("--anchor-weight", type=float, default=None, help="weight of the anchor loss (default 1)")
    f.add_argument("--closed-form", action=argparse.BooleanOptionalAction, default=None,
                   help="after training, solve the anchor edit in closed form on the layers that read the text "
                        "(UCE): the concept's prompts become the anchor's, --retain phrases are kept")
    f.add_argument("--preserve-weight", type=POSITIVE_FLOAT, default=None,
                   help="closed form: weight of the kept prompts against the concept's (default 1)")
    f.add_argument("--preserve-base", action=argparse.BooleanOptionalAction, default=None,
                   help="closed form: hold the kept prompts to the base model's outputs, not the trained ones'")
    f.add_argument("--closed-form-rounds", type=NON_NEGATIVE, default=None,
                   help="closed form: adversarial rounds (RECE) that also edit the embeddings found to bring "
                        "the concept back (default 0)")
    f.add_argument("--lora-rank", type=POSITIVE, default=4)
    f.add_argument("--lora-alpha", type=float, default=None)
    f.add_argument("--inversion", action="store_true", help="concept inversion (textual inversion) first")
    f.add_argument("--inversion-steps", type=POSITIVE, default=500)
    f.add_argument("--inversion-tokens", type=POSITIVE, default=4)
    f.add_argument("--patch-dtype", choices=list(PATCH_DTYPES), default="fp16",
                   help="deltas in fp16/bf16/fp32, int8 deltas with per-row scales (half of fp16), "
                        "or 'exact' trained tensors")
    f.add_argument("--patch-rank", type=POSITIVE, default=None,
                   help="store each changed weight as a rank-R factor pair (truncated SVD; fmn.patches.compress)")
    f.add_argument("--patch-rel-error", type=_unit_interval, default=None,
                   help="per weight, the smallest rank within this relative (Frobenius) error, e.g. 0.2")
    f.add_argument("--gradient-checkpointing", action="store_true")
    f.add_argument("--max-grad-norm", type=float, default=None)
    f.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the training steps eagerly instead of replaying CUDA graphs")
    f.add_argument("--strict", action="store_true",
                   help="refuse concepts whose words the model's tokenizer does not know (default: a warning)")
    f.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="concept attention: fused Triton kernels (auto on CUDA) or the materialising reference")
    # presets and the detector hook (fmn.presets; docs/nsfw-removal.md, docs/concept-correction.md)
    f.add_argument("--preset", default=None,
                   help="a preset of trigger phrases and templates (fmn/assets/presets/NAME.json, or a .json path): "
                        "nsfw (needs --images: fmn never draws images for it); --concept adds phrases, --template "
                        "replaces its templates")
    f.add_argument("--eval-detector", default=None, metavar="MODULE:FUNCTION",
                   help="your detector (or FILE.py:FUNCTION): a list of PIL images -> one score per image; run on "
                        "images the base and the patched model draw from the run's prompts; the share scoring >= "
                        "--eval-threshold is printed and stored in the patch's summary")
    f.add_argument("--eval-images", type=POSITIVE, default=4, help="--eval-detector: images per prompt (default 4)")
    f.add_argument("--eval-threshold", type=float, default=0.5,
                   help="--eval-detector: a score at or above it counts as flagged (default 0.5)")
    each = f.add_argument_group("many concepts, one patch each (fmn.batch; instead of --concept and --out)")
    each.add_argument("--concepts-file", default=None,
                      help="a text file: one concept, or a comma-joined group forgotten together, per line "
                           "(blank lines and # comments ignored); under accelerate launch / torchrun the lines are "
                           "spread over the processes")
    each.add_argument("--out-dir", default=None,
                      help="folder for the patches (<concept>.safetensors, one per line; existing ones are skipped "
                           "unless --force) and summary.json")
    f.set_defaults(func=cmd_forget)

    p = sub.add_parser("apply", help="apply a patch and save the patched pipeline")
    common(p)
    p.add_argument("--patch", required=True)
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.set_defaults(func=cmd_apply)

    g = sub.add_parser("generate", help="generate an image grid, optionally with a patch")
    common(g)
    g.add_argument("--patch", default=None)
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several rows)")
    g.add_argument("--out", required=True, help="PNG grid to write")
    g.add_argument("--compare", action="store_true", help="base and patched side by side")
    g.add_argument("--n", type=POSITIVE, default=4, help="images per prompt")
    g.add_argument("--steps", type=POSITIVE, default=30)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=POSITIVE, default=None)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="forgetting metrics on the built-in toy model (UA, retain accuracies)")
    common(e)
    e.add_argument("--patch", default=None, help="patch to evaluate against the base")
    e.add_argument("--forget", action="append", required=True, help="the forgotten shape or colour (repeat)")
    e.add_argument("--seeds", type=POSITIVE, default=4, help="seeds per prompt (25 prompts)")
    e.add_argument("--steps", type=POSITIVE, default=20)
    e.add_argument("--guidance-scale", type=float, default=5.0)
    e.add_argument("--out", required=True, help="JSON file to write")
    e.add_argument("--grid", default=None, help="PNG of base | patched, one image per prompt")
    e.add_argument("--robustness", action="store_true",
                   help="with --patch: the Memorization Score (textual inversion of the concept's data-set images on "
                        "base and patched model, cosine to the word's embedding) and an inversion attack's success "
                        "rate (share of 20 images drawn from the token inverted on the patched model that show the "
                        "concept); see fmn.toy.robustness")
    e.add_argument("--inversion-steps", type=int, default=None, help="inversion steps (default: fmn.toy.robustness's)")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="a patch's summary (--json: its whole record)")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true", help="the whole record as JSON (options, summary, per-step losses)")
    i.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("export", help="write a patch as a LoRA file for diffusers, A1111 or ComfyUI")
    x.add_argument("patch")
    x.add_argument("--format", choices=["diffusers", "kohya"], required=True,
                   help="diffusers: pipe.load_lora_weights(FILE); kohya: lora_unet_* keys (A1111, ComfyUI)")
    x.add_argument("--out", required=True, help="LoRA .safetensors file to write")
    x.add_argument("--rank", type=POSITIVE, default=None,
                   help="rank of every pair (default: a LoRA patch's own; deltas: smallest within --rel-error)")
    x.add_argument("--rel-error", type=_at_least(0.0, float), default=None,
                   help="relative Frobenius error bound per weight when no --rank is given (default 0.01)")
    x.add_argument("--no-bias", action="store_true",
                   help="kohya: leave the bias changes out (no .diff_b keys, which diffusers' kohya loader refuses "
                        "and A1111 ignores next to a LoRA pair; ComfyUI applies them)")
    x.add_argument("--force", action="store_true", help="overwrite an existing output")
    x.add_argument("--quiet", "-q", action="store_true", help="no summary")
    x.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    x.set_defaults(func=cmd_export)
    return ap


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (CLIError, ValueError, OSError)) else f"{type(e).__name__}: {text}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "quiet", False):
            from diffusers.utils import logging as dlog
            dlog.disable_progress_bar()
        if getattr(args, "device", None):
            _device(args.device)  # a bad --device is refused before any work
        return args.func(args)
    except KeyboardInterrupt:
        print("fmn: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (fmn info x | head): stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except SystemExit:
        raise
    except BaseException as e:
        if debug:
            import traceback
            traceback.print_exc()
        from fmn.forgetting.options import ForgetError
        where = ""
        if "torch.distributed" in sys.modules:  # under a launch: one error, from the process that failed first
            from fmn.forgetting.distributed import first_to_fail, world
            rank, size = world()
            if not first_to_fail():
                return EXIT_FAILED
            where = f"process {rank} of {size}: " if size > 1 else ""
        print(f"fmn: error: {where}{_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED if isinstance(e, ForgetError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
