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
"""
from __future__ import annotations

import torch

RIDGE = 1e-4  # rho, relative to the mean diagonal of the input Gram matrix


def rows(embeds: torch.Tensor) -> torch.Tensor:
    """[P, L, D] (or [P, D]) embeddings as [P * L, D] float64 rows."""
    return embeds.detach().reshape(-1, embeds.shape[-1]).double()


@torch.no_grad()
def solve(weight: torch.Tensor, concept: torch.Tensor, anchor: torch.Tensor, keep: torch.Tensor,
          preserve_weight: float) -> torch.Tensor:
    """The edited weight [out, in] (the objective in the module docstring); concept, anchor: [n, in] rows
    in matching order; keep: [m, in] rows. Returned in weight's dtype and device."""
    if concept.shape != anchor.shape or concept.shape[-1] != weight.shape[1] or keep.shape[-1] != weight.shape[1]:
        raise ValueError(f"closed-form edit: rows must be [n, {weight.shape[1]}] with as many anchor as concept rows, "
                         f"got concept {list(concept.shape)}, anchor {list(anchor.shape)}, keep {list(keep.shape)}")
    w = weight.detach().double().cpu()
    c, a, k = concept.double().cpu(), anchor.double().cpu(), keep.double().cpu()
    keep_gram = preserve_weight * (k.T @ k)
    gram = c.T @ c + keep_gram
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1e-12)) * torch.eye(gram.shape[0], dtype=torch.float64)
    lhs = gram + ridge                       # symmetric: W' lhs = rhs  <=>  lhs W'^T = rhs^T
    rhs = w @ (a.T @ c + keep_gram + ridge)
    return torch.linalg.solve(lhs, rhs.T).T.to(weight.dtype).to(weight.device)


@torch.no_grad()
def edit(layers, concept: list, target: list, keep: list, preserve_weight: float) -> None:
    """Sets each layer of `layers` ((parameter name, input kind, nn.Linear)) to the solution for its weight as
    it is. concept, target, keep: lists of fmn.families.base.Prompts (target: one row per concept row, same
    slots); input kind "embeds" reads their token embeddings, "pooled" their pooled vectors."""
    for _, kind, layer in layers:
        c, a, k = (stacked(texts, kind) for texts in (concept, target, keep))
        if c is None or a is None or k is None:
            continue
        layer.weight.data = solve(layer.weight, c, a, k, preserve_weight)


def stacked(prompts: list, kind: str) -> torch.Tensor | None:
    """The rows of input kind `kind` ("embeds" or "pooled") of every Prompts in the list, or None if one lacks them."""
    got = [p.embeds if kind == "embeds" else p.pooled for p in prompts]
    return None if any(g is None for g in got) else torch.cat([rows(g) for g in got])
