"""The anchor edit solved in closed form on the layers that read the text (UCE: Gandikota et al.,
"Unified Concept Editing in Diffusion Models", 2024; not in the Forget-Me-Not paper).

A linear layer y = W x + b that reads the prompt's token embeddings (the UNet's attn2 to_k / to_v; an
MM-DiT's context_embedder) is replaced by the W' that minimises

    sum_i ||W' c_i - W a_i||^2  +  lam * sum_j ||W' k_j - W k_j||^2  +  rho * ||W' - W||_F^2

c_i: the concept prompts' token embeddings (every slot of every template with the concept),
a_i: the same slots of the same templates with the anchor in the concept's place (the prompt the
     concept should turn into),
k_j: the token embeddings of the prompts to keep (the retained phrases' prompts, the empty prompt),
rho: a small ridge that leaves every direction no prompt uses as it was.
Setting the gradient to zero gives one linear system per layer (rows are embeddings, W is [out, in]):

    W' (C^T C + lam K^T K + rho I) = W (A^T C + lam K^T K + rho I)

solved in float64; a few milliseconds for all layers of an SD UNet. Where the encoder gives every slot
its own word (the toy models) the concept's prompts then produce the anchor's keys and values
exactly, up to what the kept prompts pull back.

Two options for an edit after training (fmn.forget's preserve_base, closed_form_rounds):
- the kept rows held to the *base* weights' outputs, W_0 k_j, instead of the trained ones' (the right
  side becomes W A^T C + rho W + lam W_0 K^T K): what training moved on the kept prompts goes back;
- adversarial rounds (RECE: Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image
  Diffusion Models", ECCV 2024): after each solve, the embedding that best brings the concept's base
  outputs back through the edited layers of one input kind, h_i = argmin_h sum_l ||W'_l h - W_0,l c_i||^2
  + mu ||h||^2, joins the concept rows with c_i's anchor row, and the edit is solved again. An
  inversion attack searches for such embeddings through the text encoder; each round closes the ones found.
"""
from __future__ import annotations

import torch

RIDGE = 1e-4  # rho, relative to the mean diagonal of the input Gram matrix
ADVERSARIAL_RIDGE = 1.0  # mu, relative to the mean diagonal of sum_l W'_l^T W'_l (docs/toy-tuning.md)


def rows(embeds: torch.Tensor) -> torch.Tensor:
    """[P, L, D] (or [P, D]) embeddings as [P * L, D] float64 rows."""
    return embeds.detach().reshape(-1, embeds.shape[-1]).double()


@torch.no_grad()
def solve(weight: torch.Tensor, concept: torch.Tensor, anchor: torch.Tensor, keep: torch.Tensor,
          preserve_weight: float, keep_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The edited weight [out, in] (the objective in the module docstring); concept, anchor: [n, in] rows
    in matching order; keep: [m, in] rows, held to keep_weight's outputs (None: weight's). Returned in
    weight's dtype and device."""
    if concept.shape != anchor.shape or concept.shape[-1] != weight.shape[1] or keep.shape[-1] != weight.shape[1]:
        raise ValueError(f"closed-form edit: rows must be [n, {weight.shape[1]}] with as many anchor as concept rows, "
                         f"got concept {list(concept.shape)}, anchor {list(anchor.shape)}, keep {list(keep.shape)}")
    if keep_weight is not None and keep_weight.shape != weight.shape:
        raise ValueError(f"closed-form edit: keep_weight must have weight's shape {list(weight.shape)}, "
                         f"got {list(keep_weight.shape)}")
    w = weight.detach().double().cpu()
    w_keep = w if keep_weight is None else keep_weight.detach().double().cpu()
    c, a, k = concept.double().cpu(), anchor.double().cpu(), keep.double().cpu()
    keep_gram = preserve_weight * (k.T @ k)
    gram = c.T @ c + keep_gram
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1e-12)) * torch.eye(gram.shape[0], dtype=torch.float64)
    lhs = gram + ridge                       # symmetric: W' lhs = rhs  <=>  lhs W'^T = rhs^T
    rhs = w @ (a.T @ c + ridge) + w_keep @ keep_gram
    return torch.linalg.solve(lhs, rhs.T).T.to(weight.dtype).to(weight.device)


@torch.no_grad()
def adversarial_rows(edited: list, targets: list, concept: torch.Tensor) -> torch.Tensor:
    """[n, in] rows h_i = argmin_h sum_l ||edited_l h - targets_l c_i||^2 + mu ||h||^2 (RECE; mu:
    ADVERSARIAL_RIDGE times the mean diagonal of sum_l edited_l^T edited_l): the embeddings that bring the
    concept rows' outputs under `targets` back through the `edited` weights ([out_l, in] each)."""
    e = [w.detach().double().cpu() for w in edited]
    gram = sum(w.T @ w for w in e)
    rhs = sum(w.T @ (t.detach().double().cpu() @ concept.double().cpu().T) for w, t in zip(e, targets))
    mu = ADVERSARIAL_RIDGE * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + mu * torch.eye(gram.shape[0], dtype=torch.float64), rhs).T


@torch.no_grad()
def edit(layers, concept: list, target: list, keep: list, preserve_weight: float, base: dict | None = None,
         rounds: int = 0) -> None:
    """Sets each layer of `layers` ((parameter name, input kind, nn.Linear)) to the solution for its weight as
    it is. concept, target, keep: lists of fmn.families.base.Prompts (target: one row per concept row, same
    slots); input kind "embeds" reads their token embeddings, "pooled" their pooled vectors. base: {name:
    base weight}: the kept rows held to its outputs and the adversarial `rounds` aimed at them (None: the
    weights as they are)."""
    kinds = {}
    for name, kind, layer in layers:
        kinds.setdefault(kind, []).append((name, layer))
    for kind, group in kinds.items():
        c, a, k = (stacked(texts, kind) for texts in (concept, target, keep))
        if c is None or a is None or k is None:
            continue
        start = [layer.weight.detach().clone() for _, layer in group]
        ref = [w if base is None else base[name].to(w) for (name, _), w in zip(group, start)]
        rows_c, rows_a = c, a
        for r in range(rounds + 1):
            for (_, layer), w, w0 in zip(group, start, ref):
                layer.weight.data = solve(w, rows_c, rows_a, k, preserve_weight, keep_weight=w0)
            if r < rounds:
                found = adversarial_rows([layer.weight for _, layer in group], ref, c)
                rows_c, rows_a = torch.cat([rows_c, found]), torch.cat([rows_a, a])


def stacked(prompts: list, kind: str) -> torch.Tensor | None:
    """The rows of input kind `kind` ("embeds" or "pooled") of every Prompts in the list, or None if one lacks them."""
    got = [p.embeds if kind == "embeds" else p.pooled for p in prompts]
    return None if any(g is None for g in got) else torch.cat([rows(g) for g in got])
