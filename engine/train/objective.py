"""The training objective of "Diagnosing and Mitigating Modality Interference" (§4, App. D):
loss = CE + CE_adv + w·consistency, each term present only where the method asks for it.

- ``answer_logits``: one forward pass, logits only at the positions that predict answer tokens (position t
  predicts token t+1), with their targets.
- ``js_divergence`` / ``kl_divergence``: per-token divergences of softmax(z/T); ``consistency`` averages them
  over answer tokens, then over pairs.
- ``pgd_perturbation``: δ on the language model's input embeddings (after image features are merged), masked
  to the irrelevant modality, K raw-gradient ascent steps projected onto the ε-ball.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_logits(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K, V) at the positions that predict an answer token of any row, and their targets (B, K),
    ``IGNORE`` where that row has no answer token there. Keeping only those positions spares the LM head the
    prompt and image tokens."""
    predicts = labels[:, 1:] != IGNORE
    keep = predicts.any(0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep).logits
    return logits, labels[:, keep + 1]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the answer tokens of the batch."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """JS(P, Q) = ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2, with P = softmax(p/T), Q = softmax(q/T); one value per
    row of the leading dimensions (nats)."""
    log_p = F.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P‖Q) = Σ P (log P − log Q), P the anchor (the original's prediction); one value per row."""
    log_p = F.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


DIVERGENCES = {"js": js_divergence, "kl": kl_divergence}


def consistency(pairs: list[tuple[torch.Tensor, torch.Tensor]], divergence: str = "js", temperature: float = 1.0,
                anchor_gradient: bool = False) -> torch.Tensor | None:
    """Mean over pairs of the mean over answer tokens of divergence(P_original, Q_perturbed). Each pair holds
    the (tokens, V) logits of the original and of the perturbed input at the same answer tokens. P is a
    stop-gradient anchor unless ``anchor_gradient``. None when there is no pair."""
    if not pairs:
        return None
    function = DIVERGENCES[divergence]
    values = [function(p if anchor_gradient else p.detach(), q, temperature).mean() for p, q in pairs]
    return torch.stack(values).mean()


def answer_rows(logits: torch.Tensor, targets: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's logits at its own answer tokens, in order, and those tokens."""
    keep = targets[row] != IGNORE
    return logits[row][keep], targets[row][keep]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the language model's inputs are known."""


VISION_INPUTS = ("pixel_values", "pixel_attention_mask")


def merged_embeddings(model, inputs: dict) -> torch.Tensor:
    """The language model's input embeddings with the image features merged in, as the model computes them;
    the forward stops at the language model's door (a pre-hook raises), so only the embedding lookup and the
    vision side run. PGD reuses them for its K + 1 passes instead of re-running the vision tower each time
    (the vision side is frozen in every mode, so nothing is lost; with ``--full`` the token embeddings keep
    their graph)."""
    box = {}

    def hook(module, args, kwargs):
        box["embeds"] = kwargs.get("inputs_embeds")
        raise _Stop

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if box.get("embeds") is None:
        raise RuntimeError("the language model was not given inputs_embeds; cannot perturb its inputs")
    return box["embeds"]


def without_vision(inputs: dict) -> dict:
    """The inputs minus the pixels: with the merged embeddings supplied by the hook, the vision tower need
    not run again (Qwen2.5-VL keeps ``image_grid_thw`` for its M-RoPE positions)."""
    return {k: v for k, v in inputs.items() if k not in VISION_INPUTS}


@contextmanager
def embedding_perturbation(model, delta: torch.Tensor, mask: torch.Tensor, base: torch.Tensor | None = None):
    """While active, the language model receives embeddings + δ where ``mask`` (B, L) is set and the
    untouched embedding elsewhere (``torch.where``, so those stay bitwise equal). The embeddings are ``base``
    (from ``merged_embeddings``) when given, else those the model computed. A forward pre-hook on the language
    model fires after the image features have been merged, for every architecture that hands
    ``inputs_embeds`` to its language model (Idefics3, Qwen2.5-VL, LLaVA-OneVision)."""

    def hook(module, args, kwargs):
        embeds = base if base is not None else kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("the language model was not given inputs_embeds; cannot perturb its inputs")
        perturbed = (embeds.float() + delta).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.where(mask[..., None], perturbed, embeds)
        return args, kwargs

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class PGDStats:
    step_ratio: float  # max over steps of ‖α·g‖∞ / ε
    delta_max: float  # ‖δ‖∞ after the last step


def pgd_perturbation(model, inputs: dict, labels: torch.Tensor, mask: torch.Tensor, epsilon: float, alpha: float,
                     steps: int, base: torch.Tensor | None = None) -> tuple[torch.Tensor, PGDStats]:
    """δ maximising the answer CE within ‖δ‖∞ ≤ ε on the masked positions (§4.1, raw-gradient PGD).

    δ starts Gaussian, scaled so that its largest entry is ε, then takes ``steps`` steps
    δ ← Π_ε(δ + α·∇δ CE) with the raw gradient (no sign), computed with ``torch.autograd.grad`` on δ alone
    (the weights receive no gradient from these passes). ``base``: the merged embeddings, computed here when
    not given. Returns δ (fp32, zero outside ``mask``)."""
    if base is None:
        base = merged_embeddings(model, inputs)
    text_inputs = without_vision(inputs)
    noise = torch.randn(base.shape, device=base.device)
    scale = noise.abs().amax().clamp_min(1e-12)
    delta = torch.where(mask[..., None], noise * (epsilon / scale), 0.0)
    ratio = 0.0
    for _ in range(steps):
        delta.requires_grad_(True)
        with embedding_perturbation(model, delta, mask, base):
            logits, targets = answer_logits(model, text_inputs, labels)
            loss = cross_entropy(logits, targets)
        (gradient,) = torch.autograd.grad(loss, delta)
        step = alpha * gradient
        ratio = max(ratio, float(step.abs().max()) / epsilon)
        delta = torch.where(mask[..., None], (delta.detach() + step).clamp(-epsilon, epsilon), 0.0)
    return delta.detach(), PGDStats(ratio, float(delta.abs().max()) if delta.numel() else 0.0)
