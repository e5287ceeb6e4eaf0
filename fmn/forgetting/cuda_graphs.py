"""The training steps' denoiser calls replayed as CUDA graphs (torch.cuda.make_graphed_callables).

A forgetting step calls the denoiser with the same shapes every step, and at SD sizes its few
hundred small kernels cost more to launch than to run. `GraphedDenoiser` captures the forward and
the backward of each call signature once (shapes, dtypes, constant arguments, which attention masks
are set) and replays them: one launch per pass instead of one per kernel.

What is captured is a module that takes the call's tensors and the attention context's masks, runs
the denoiser with the context set to them, and returns its output and the concept scores the fused
processors recorded; on replay the scores go to the caller's recorder under the captured layer
names. Calls run eagerly when there is no gradient (evaluation, caches of base outputs), when more
than `max_graphs` signatures were seen, or after a capture failed: then once a warning, and the run
goes on without graphs.

Order the trainer keeps: each graphed call's backward runs before the next graphed call (the
replays' outputs live in the graph's buffers until the next replay of the same graph).
"""
from __future__ import annotations

import warnings

import torch

from fmn.processors.attention import ConceptScores, using

MASKS = ("concept_weights", "zero_mask")


def unavailable(opts, device: torch.device, processes: int = 1) -> str | None:
    """Why a run cannot use CUDA graphs (None: it can)."""
    if not opts.cuda_graphs:
        return "turned off (cuda_graphs=False)"
    if device.type != "cuda":
        return f"needs CUDA, the run is on {device.type}"
    if processes > 1:
        return "not with several processes"
    if opts.gradient_checkpointing:
        return "not with gradient checkpointing"
    return None


def capture_graphs(module: torch.nn.Module, sample_args: tuple) -> torch.nn.Module:
    """torch's capture of module's forward and backward (allow_unused_input: a trainable weight
    that reaches no recorded score, e.g. the last layer's output projection, gets no gradient)."""
    return torch.cuda.make_graphed_callables(module, sample_args, num_warmup_iters=2, allow_unused_input=True)


class CallSpec:
    """A call's arguments with the tensors taken out: `tensors`, `key` (hashable: shapes, dtypes,
    devices and every constant), and `rebuild(tensors)` -> (args, kwargs). `key` is None for a call
    holding something that is neither a tensor nor a plain constant (not graphed)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.tensors = []
        self.key = []
        self.tree = self._take((args, kwargs))
        self.key = None if self.key is None else tuple(self.key)

    def _take(self, value):
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
            if self.key is not None:
                self.key.append((tuple(value.shape), value.dtype, value.device, value.requires_grad))
            return ("tensor", len(self.tensors) - 1)
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, [self._take(v) for v in value])
        if isinstance(value, dict):
            return ("dict", {k: self._take(v) for k, v in value.items()})
        if self.key is not None:
            if isinstance(value, (bool, int, float, str, type(None))):
                self.key.append((type(value).__name__, value))
            else:
                self.key = None
        return ("const", value)

    def rebuild(self, tensors):
        def build(node):
            kind, value = node
            if kind == "tensor":
                return tensors[value]
            if kind == "dict":
                return {k: build(v) for k, v in value.items()}
            if kind in ("tuple", "list"):
                items = [build(v) for v in value]
                return tuple(items) if kind == "tuple" else items
            return value
        return build(self.tree)


def output_tensors(out):
    """(tensors, rebuild) of a denoiser output: a tensor, a tuple / list of tensors, or a diffusers
    BaseOutput (UNet2DConditionOutput ...)."""
    if isinstance(out, torch.Tensor):
        return [out], lambda ts: ts[0]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        kind = type(out)
        return list(out), lambda ts: kind(ts)
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        keys, kind = list(out.keys()), type(out)
        return list(out.to_tuple()), lambda ts: kind(**dict(zip(keys, ts)))
    raise TypeError(f"cannot graph a denoiser returning {type(out).__name__}")


class CapturedCall(torch.nn.Module):
    """What one graph computes: the denoiser on a call's tensors with the context's masks set to the
    trailing inputs; returns the output's tensors, then the recorded scores (layers: `layers`)."""

    def __init__(self, model, context, spec: CallSpec, masks: tuple, recording: bool, detach_output: bool):
        super().__init__()
        self.model = model
        self.context, self.spec, self.masks = context, spec, masks
        self.recording, self.detach_output = recording, detach_output
        self.layers, self.n_out, self.rebuild_output = [], 0, None

    def forward(self, *tensors):
        n_call = len(self.spec.tensors)
        args, kwargs = self.spec.rebuild(tensors[:n_call])
        recorder = ConceptScores() if self.recording else None
        self.context.prepared.clear()  # masks derived inside the graph, from its own inputs
        with using(self.context, recorder=recorder, **dict(zip(self.masks, tensors[n_call:]))):
            out = self.model(*args, **kwargs)
        outs, self.rebuild_output = output_tensors(out)
        if self.detach_output:
            outs = [o.detach() for o in outs]
        self.n_out = len(outs)
        self.layers = list(recorder.layers) if recorder is not None else []
        return tuple(outs) + tuple(recorder.scores if recorder is not None else ())


class GraphedDenoiser:
    """Calls `model` like the model itself, replaying CUDA graphs where it can (module docstring).

    context: the attention context the fused processors read (its masks become graph inputs and
    its recorder gets the replayed scores); detach_recorded_output: calls that record scores do not
    need their output's gradient (the attention loss alone), so the graph does not compute it;
    capture(module, sample_args) -> graphed module (capture_graphs; tests pass their own).
    """

    def __init__(self, model, context, *, detach_recorded_output=False, capture=None, max_graphs=4):
        self.model, self.context = model, context
        self.detach_recorded_output = detach_recorded_output
        self.capture = capture or capture_graphs
        self.max_graphs = max_graphs
        self.graphs = {}
        self.failure = None
        self.replays = 0

    def __call__(self, *args, **kwargs):
        if self.failure is not None or not torch.is_grad_enabled():
            return self.model(*args, **kwargs)
        spec = CallSpec(args, kwargs)
        masks = tuple(name for name in MASKS if getattr(self.context, name) is not None)
        mask_tensors = [getattr(self.context, name) for name in masks]
        recording = self.context.recorder is not None
        if spec.key is None:
            return self.model(*args, **kwargs)
        key = (spec.key, masks, tuple((tuple(m.shape), m.dtype, m.device) for m in mask_tensors), recording)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.model(*args, **kwargs)
            entry = self._capture(key, spec, masks, mask_tensors, recording)
            if entry is None:
                return self.model(*args, **kwargs)
        graphed, captured = entry
        self.replays += 1
        results = graphed(*spec.tensors, *mask_tensors)
        if recording:
            for layer, score in zip(captured.layers, results[captured.n_out:]):
                self.context.recorder.add(layer, score)
        return captured.rebuild_output(list(results[:captured.n_out]))

    def _capture(self, key, spec, masks, mask_tensors, recording):
        """(graphed module, its CapturedCall) for this signature, or None after a failure (warned once)."""
        module = CapturedCall(self.model, self.context, spec, masks, recording,
                              recording and self.detach_recorded_output)
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in (*spec.tensors, *mask_tensors))
        try:
            graphed = self.capture(module, sample)
        except Exception as e:  # any capture failure: eager from here on
            self.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"CUDA graph capture failed ({self.failure}); the run goes on without CUDA graphs "
                          "(cuda_graphs=False / --no-cuda-graphs skips the attempt)", stacklevel=3)
            return None
        finally:
            self.context.prepared.clear()
        self.graphs[key] = (graphed, module)
        return self.graphs[key]

    def status(self) -> str:
        """For the run's summary: on (graphs captured, replays), or why not."""
        if self.failure is not None:
            return f"failed at capture, ran eagerly ({self.failure})"
        return f"on ({len(self.graphs)} graphs, {self.replays} replays)"
