"""How forgotten a concept stays on the toy models ("toy" and "toy-mmdit"): the paper's Memorization Score
and an inversion attack.

Both start from textual inversion (Gal et al. 2022) of the concept's *probe images*: renders of the
procedural data set (fmn.toy.data, not model samples) with the concept fixed and the other attribute
cycled ("a red circle", "a green circle", ...). One new token's input embedding is learned, from a
random start with a fixed seed (one per text encoder: toy-mmdit has two), so that the pipeline's denoiser
(UNet or MM-DiT transformer, through its fmn.families family: noise, target, prompt encoding) denoises
the probe latents given
"a {colour} <token>" (a shape) or "a <token> {shape}" (a colour): the denoising loss textual inversion
uses; only that embedding row changes.

- memorization_score(): the paper's Memorization Score (Sec. 4.2): cosine similarity between the
  concept word's and the inverted token's text-encoder embeddings (the encoder's output at the word's
  slot, averaged over the probe prompts), with the token inverted once on the base model and once on
  the patched one; forgetting should lower it. The paper inverts with SD's CLIP; here the toy encoder.
- attack(): an inversion attack: invert on the *patched* model (a fixed budget of steps), then draw
  images from the learned token in the probe prompts with fixed seeds and classify them; the attack
  success rate is the share that shows the concept again.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fmn.families.base import Prompts
from fmn.toy.data import COLORS, SHAPES, make_sample, to_tensor

TOKEN = "<fmn-probe>"
INVERSION_STEPS = 150
INVERSION_LR = 2e-2
PROBE_IMAGES = 10
ATTACK_SEEDS = (0, 1, 2, 3)


def _domain(concept: str) -> str:
    if concept in SHAPES:
        return "shape"
    if concept in COLORS:
        return "color"
    raise ValueError(f"concept must be one of the toy model's shapes {SHAPES} or colours {COLORS}, got {concept!r}")


def probe_prompts(concept: str, word: str) -> list[str]:
    """One prompt per value of the other attribute, `word` in the concept's slot (same order as probes)."""
    if _domain(concept) == "shape":
        return [f"a {c} {word}" for c in COLORS]
    return [f"a {word} {s}" for s in SHAPES]


def probe_images(concept: str, n: int = PROBE_IMAGES, seed: int = 1234):
    """(pixels [n,3,32,32] in [-1,1], index into probe_prompts per image): data-set renders of the concept."""
    shape = _domain(concept) == "shape"
    pix, which = [], []
    for i in range(n):
        other = i % 5
        smp = make_sample(seed, i, shape=SHAPES.index(concept) if shape else other,
                          color=other if shape else COLORS.index(concept), partial_prob=0.0)
        pix.append(to_tensor(smp.image))
        which.append(other)
    return torch.stack(pix), which


TEXT_PART_NAMES = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))


def text_part_names(pipe) -> list[tuple[str, str]]:
    """The pipeline's (tokenizer, text encoder) attribute names that are set: one pair on the UNet toy, two
    on toy-mmdit (its CLIP-L and CLIP-G analogues), each with its own input embedding table."""
    return [(t, e) for t, e in TEXT_PART_NAMES if getattr(pipe, t, None) is not None
            and getattr(pipe, e, None) is not None]


def with_token(pipe, vectors, token: str = TOKEN):
    """A copy of `pipe` sharing its denoiser, VAE and scheduler, whose tokenizers and text encoders (copies)
    know `token` with input embedding vectors[i] in the i-th text encoder (text_part_names; a single tensor
    for a one-encoder pipeline)."""
    names = text_part_names(pipe)
    vectors = [vectors] if torch.is_tensor(vectors) else list(vectors)
    if len(vectors) != len(names):
        raise ValueError(f"vectors: expected one per text encoder ({len(names)}), got {len(vectors)}")
    modules = {}
    for (t, e), vector in zip(names, vectors):
        tok, enc = copy.deepcopy(getattr(pipe, t)), copy.deepcopy(getattr(pipe, e))
        if tok.add_tokens([token]) != 1:
            raise ValueError(f"token {token!r} is already in {t}")
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            enc.get_input_embeddings().weight[-1] = vector.to(enc.dtype)
        modules.update({t: tok, e: enc})
    out = copy.copy(pipe)  # shallow: a new components mapping over the same modules
    out.register_modules(**modules)
    return out


def _token_ids(tok, prompts, device):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def random_starts(pipe, g: torch.Generator) -> list[torch.Tensor]:
    """Per text encoder: a random direction (drawn from g in text_part_names order) at its vocabulary's
    mean norm, the same for every model with that vocabulary."""
    starts = []
    for _, e in text_part_names(pipe):
        emb = getattr(pipe, e).get_input_embeddings().weight.detach()
        r = torch.randn(emb.shape[1], generator=g)
        starts.append(r / r.norm() * emb.norm(dim=-1).mean().cpu())
    return starts


@torch.no_grad()
def probe_latents(pipe, concept: str, n_images: int, device) -> tuple[torch.Tensor, list[int]]:
    """The probe images VAE-encoded as the pipelines do ((mean - shift_factor) * scaling_factor), and
    which probe prompt each shows."""
    pix, which = probe_images(concept, n_images)
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    mean = vae.encode(pix.to(device, vae.dtype)).latent_dist.mean
    return (mean - shift) * vae.config.scaling_factor, which


def new_rows_only(tables):
    """Gradient hooks so that only each table's last row (the new token) learns; sets requires_grad."""
    for table in tables:
        row = torch.zeros(table.shape[0], 1, device=table.device)
        row[-1] = 1.0
        table.requires_grad_(True)
        table.register_hook(lambda grad, row=row: grad * row)


def inversion_loss(family, tfamily, latents, which, prompts, g):
    """One textual-inversion step's denoising loss on 2 probe latents (the family's noise, target and
    denoiser; `tfamily` encodes with the token-bearing text encoders)."""
    i = torch.randint(len(latents), (2,), generator=g)
    t = torch.randint(family.timestep_count(), (2,), generator=g).to(latents.device)
    noise = torch.randn(latents[i].shape, generator=g).to(latents.device)
    x0 = latents[i]
    x_t = family.add_noise(x0, noise, t)
    embeds, pooled = tfamily.encode_prompts([prompts[which[k]] for k in i.tolist()])
    text = Prompts(embeds, pooled, [0, 0], resolution=x0.shape[-1] * family.pipe.vae_scale_factor)
    out = family.predict(family.denoiser, x_t, t, text, torch.arange(2))
    return F.mse_loss(out.float(), family.target(x0, noise, t).float())


def invert(pipe, concept: str, steps: int = INVERSION_STEPS, lr: float = INVERSION_LR, n_images: int = PROBE_IMAGES,
           seed: int = 0, token: str = TOKEN) -> dict:
    """Textual inversion of the concept's probe images on `pipe` (its denoiser as it is: base or patched;
    the UNet toy or toy-mmdit, through its fmn.families family), one new input embedding per text encoder.

    Returns {"vectors": learned input embedding per text encoder, "vector": the first encoder's, "losses":
    per step, "pipe": with_token(pipe, vectors)}. The start is a random direction at each vocabulary's mean
    norm (seed `seed`), the same for every model.
    """
    from fmn.families import family_for

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    family = family_for(pipe)
    g = torch.Generator().manual_seed(seed)
    tpipe = with_token(pipe, random_starts(pipe, g), token)
    tfamily = family_for(tpipe)
    tables = [getattr(tpipe, e).get_input_embeddings().weight for _, e in text_part_names(tpipe)]
    for _, e in text_part_names(tpipe):
        getattr(tpipe, e).requires_grad_(False)
    new_rows_only(tables)
    latents, which = probe_latents(pipe, concept, n_images, family.denoiser.device)
    prompts = probe_prompts(concept, token)
    opt = torch.optim.AdamW(tables, lr=lr, weight_decay=0.0)
    grad_flags = [p.requires_grad for p in family.denoiser.parameters()]
    family.denoiser.requires_grad_(False)
    losses = []
    try:
        for _ in range(steps):
            loss = inversion_loss(family, tfamily, latents, which, prompts, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p, flag in zip(family.denoiser.parameters(), grad_flags):
            p.requires_grad_(flag)
        for table in tables:
            table.requires_grad_(False)
    vectors = [table[-1].detach().clone() for table in tables]
    return {"vectors": vectors, "vector": vectors[0], "losses": losses, "pipe": with_token(pipe, vectors, token),
            "steps": steps, "lr": lr}


@torch.no_grad()
def embedding_similarity(pipe_with_token, concept: str, token: str = TOKEN) -> float:
    """Mean cosine similarity of the text encoder's outputs at the concept's slot, word vs token, over
    the probe prompts (the UNet toy's encoder has no attention: a slot's output depends on its token and
    place). The first text encoder's last hidden state (toy-mmdit: its CLIP-L analogue)."""
    tok, enc = pipe_with_token.tokenizer, pipe_with_token.text_encoder
    device = enc.device
    word = enc(_token_ids(tok, probe_prompts(concept, concept), device)).last_hidden_state
    inv = enc(_token_ids(tok, probe_prompts(concept, token), device)).last_hidden_state
    ids = _token_ids(tok, probe_prompts(concept, token), device)
    pos = int(torch.nonzero(ids[0] == tok.convert_tokens_to_ids(token))[0])
    word_ids = _token_ids(tok, probe_prompts(concept, concept), device)
    if not bool((word_ids[:, pos] == tok.convert_tokens_to_ids(concept + "</w>")).all()):
        raise ValueError(f"{concept!r} is not one token at the probe token's place in "
                         f"{probe_prompts(concept, concept)}")
    return float(F.cosine_similarity(word[:, pos], inv[:, pos], dim=-1).mean())


def memorization_score(base, patched, concept: str, steps: int = INVERSION_STEPS, lr: float = INVERSION_LR,
                       seed: int = 0) -> dict:
    """The paper's Memorization Score: similarity of the inverted token to the concept's word, inverted on
    the base and on the patched model (same probes, start and steps). Returns {"base", "patched", "change"}:
    change < 0 means the patched model's inversion lies further from the word (the concept is forgotten)."""
    before = embedding_similarity(invert(base, concept, steps, lr, seed=seed)["pipe"], concept)
    after = embedding_similarity(invert(patched, concept, steps, lr, seed=seed)["pipe"], concept)
    return {"base": before, "patched": after, "change": after - before, "steps": steps, "lr": lr,
            "probe_images": PROBE_IMAGES}


@torch.no_grad()
def shown_rate(pipe_with_token, concept: str, classifier, seeds=ATTACK_SEEDS, token: str = TOKEN, **gen_kw) -> float:
    """Share of images drawn from the token in the probe prompts (fixed seeds) classified as the concept."""
    from fmn.toy.evaluate import PromptSpec, generate

    shape = _domain(concept) == "shape"
    others = COLORS if shape else SHAPES
    specs = [PromptSpec(p, concept if shape else o, o if shape else concept)
             for p, o in zip(probe_prompts(concept, token), others)]
    images, _ = generate(pipe_with_token, specs, seeds, **gen_kw)
    pred = classifier.classify(images)
    if shape:
        hit = pred["shape"] == SHAPES.index(concept)
    else:
        hit = (pred["color"] == COLORS.index(concept)) & (pred["shape"] < len(SHAPES))
    return float(hit.float().mean())


def attack(patched, concept: str, classifier=None, steps: int = INVERSION_STEPS, lr: float = INVERSION_LR,
           seeds=ATTACK_SEEDS, seed: int = 0, drawing_in=None) -> dict:
    """Inversion attack on a (patched) pipeline: invert the concept's probe images on it with `steps`
    steps, draw 5 prompts x len(seeds) images from the learned token, and return the share showing the
    concept ("success") with the attack's settings and its inverted-token pipeline ("pipe").

    drawing_in: for a defence applied at generation (e.g. `lambda p: fmn.suppress(p, [concept])`), a
    function of the token-bearing pipeline giving the context to draw in. It must wrap that pipeline, not
    `patched`: a wrapper on `patched` would draw with its text encoder, which lacks the token."""
    if classifier is None:
        from fmn.toy.classifier import load_classifier
        classifier = load_classifier()
    inv = invert(patched, concept, steps, lr, seed=seed)
    with (drawing_in or (lambda p: nullcontext()))(inv["pipe"]):
        success = shown_rate(inv["pipe"], concept, classifier, seeds)
    first, last = inv["losses"][:20], inv["losses"][-20:]  # means over 20 steps: one step's loss is noisy
    return {"success": success, "steps": steps, "lr": lr, "n_images": 5 * len(list(seeds)),
            "loss_first": sum(first) / len(first) if first else None,
            "loss_last": sum(last) / max(1, len(last)), "pipe": inv["pipe"], "vector": inv["vector"]}


def report(base, patched, concepts, classifier=None, steps: int = INVERSION_STEPS, lr: float = INVERSION_LR,
           seeds=ATTACK_SEEDS, **gen_kw) -> dict:
    """Per concept: the Memorization Score (base, patched, change) and the inversion attack's success on the
    patched model and, for reference, on the base model (same budget): {concept: {...}}. gen_kw: sampling
    settings of the attack's images (fmn.toy.evaluate.generate)."""
    if classifier is None:
        from fmn.toy.classifier import load_classifier
        classifier = load_classifier()
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    out = {}
    for c in concepts:
        on_base, on_patched = invert(base, c, steps, lr), invert(patched, c, steps, lr)
        ms_base = embedding_similarity(on_base["pipe"], c)
        ms_patched = embedding_similarity(on_patched["pipe"], c)
        out[c] = {"memorization_score": {"base": ms_base, "patched": ms_patched, "change": ms_patched - ms_base},
                  "attack_success": shown_rate(on_patched["pipe"], c, classifier, seeds, **gen_kw),
                  "attack_success_on_base": shown_rate(on_base["pipe"], c, classifier, seeds, **gen_kw),
                  "inversion_steps": steps, "inversion_lr": lr, "probe_images": PROBE_IMAGES,
                  "attack_images": 5 * len(list(seeds))}
    return out


def forget_with_inversion(pipe, concepts, rounds: int = 1, steps: int = INVERSION_STEPS, lr: float = INVERSION_LR,
                          method: str = "closed-form", **options):
    """A defence against the inversion attack: fmn.forget with the toy defaults of `method` (fmn.toy.defaults;
    toy-mmdit: fmn.toy.mmdit_defaults), overridden by `options`, then `rounds` times: invert each concept on
    the patched model (as the attack does, other seeds) and forget the inverted tokens together with the words
    (each token anchored like its word; the closed form solves again over the edited weights, the attention
    rule trains its steps again). Changes the pipeline's denoiser in place; returns the per-round patches
    (each relative to the weights before it)."""
    import fmn
    from fmn.families import family_for
    from fmn.toy import defaults, mmdit_defaults

    toy = mmdit_defaults if family_for(pipe).name == "mmdit" else defaults
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    opts = dict(toy.forget_defaults(concepts, method=method), **options)
    patches = [fmn.forget(pipe, concepts, inplace=True, progress=False, **opts)]
    for r in range(rounds):
        tpipe = pipe
        tokens = []
        for k, c in enumerate(concepts):
            token = f"<fmn-inv{r}-{k}>"
            vectors = invert(tpipe, c, steps, lr, seed=100 + r, token=token)["vectors"]
            tpipe = with_token(tpipe, vectors, token)  # shares the denoiser: training it trains pipe's
            tokens.append(token)
        round_opts = dict(opts)
        if opts.get("anchor"):
            round_opts["anchor"] = list(opts["anchor"]) * 2
            domain = "shape" if concepts[0] in SHAPES else "color"
            if opts["steps"]:
                round_opts["steps"] = options.get("steps", toy.ANCHOR_STEPS[domain] * len(concepts))
        patches.append(fmn.forget(tpipe, concepts + tokens, inplace=True, progress=False, **round_opts))
    return patches
