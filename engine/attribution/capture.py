"""Representations for attribution, from one forward pass per sample with the image present, captured with
forward hooks on the language model of an image-text-to-text model (Idefics3/SmolVLM, Qwen2.5-VL,
LLaVA-OneVision: the same hooks serve all three, because each merges its projected image features into the
language model's input embeddings at the image-token positions):

- X1, the image: the language model's input embeddings at the image tokens, i.e. the image features after
  the projector, averaged over the image tokens;
- X2, the text: the input embeddings of the question's tokens, averaged (input embeddings do not depend on
  context, so they are read from the embedding table for the question tokenised alone);
- Y, per requested layer ℓ (1 … L): the output of decoder block ℓ, the residual stream that
  ``output_hidden_states[ℓ]`` holds (after the final norm for ℓ = L, as there), at the last prompt token (``pool="last"``) or averaged over the
  prompt's positions (``pool="mean"``).
"""

from __future__ import annotations

import time

import numpy as np

from engine.models.backends import Request, TransformersBackend


def language_model(model):
    """The decoder of an image-text-to-text model (also through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    if not hasattr(decoder, "layers"):
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")
    return base, decoder


def layer_count(backend: TransformersBackend) -> int:
    return len(language_model(backend.model)[1].layers)


def default_layers(count: int, how_many: int = 5) -> list[int]:
    """``how_many`` layers spread evenly over depth, the first and the last included."""
    return sorted({int(round(x)) for x in np.linspace(1, count, min(how_many, count))})


def capture(backend: TransformersBackend, requests: list[Request], questions: list[str], layers: list[int],
            pool: str = "last") -> dict[str, np.ndarray]:
    """One batched forward pass: ``{"image": (B, d), "text": (B, d), "layer{ℓ}": (B, d) ...}`` as float32.
    A row without image tokens gets NaN image features (the caller rejects it)."""
    import torch

    base, decoder = language_model(backend.model)
    image_token = base.config.image_token_id
    inputs = backend._inputs(requests)
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    seen: dict[str, torch.Tensor] = {}

    def take_inputs(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and len(args) > 4:
            embeds = args[4]
        seen["inputs_embeds"] = embeds.detach()

    def take_layer(name: str):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[name] = hidden.detach()
        return hook

    # prepended: X1 is what the projector produced, whatever other hooks then do to the decoder's input
    handles = [decoder.register_forward_pre_hook(take_inputs, with_kwargs=True, prepend=True)]
    for layer in layers:
        # output_hidden_states[L] is the last block's output after the final norm: hook the norm there
        last = layer == len(decoder.layers) and hasattr(decoder, "norm")
        module = decoder.norm if last else decoder.layers[layer - 1]
        handles.append(module.register_forward_hook(take_layer(f"layer{layer}")))
    extra = {"logits_to_keep": 1} if backend.trims_logits else {}
    start = time.perf_counter()
    try:
        with torch.no_grad():
            backend.model(**inputs.to(backend.device), **extra)
    finally:
        for handle in handles:
            handle.remove()
    backend.model_seconds += time.perf_counter() - start

    out = {}
    is_image = (input_ids == image_token).to(seen["inputs_embeds"].device)
    counts = is_image.sum(1, keepdim=True)
    embeds = seen["inputs_embeds"].float()
    image = (embeds * is_image.unsqueeze(-1)).sum(1) / counts.clamp(min=1)
    image[counts.squeeze(1) == 0] = float("nan")
    out["image"] = image.cpu().numpy()
    tokenizer = backend.processor.tokenizer
    table = base.get_input_embeddings()
    text = []
    with torch.no_grad():
        for question in questions:
            ids = tokenizer(question, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id]
            text.append(table(torch.tensor(ids, device=table.weight.device)).float().mean(0))
    out["text"] = torch.stack(text).cpu().numpy()
    positions = mask.to(embeds.device).unsqueeze(-1).float()
    for layer in layers:
        hidden = seen[f"layer{layer}"].float()
        # left padding: the last position is every row's last prompt token
        pooled = hidden[:, -1] if pool == "last" else (hidden * positions).sum(1) / positions.sum(1)
        out[f"layer{layer}"] = pooled.cpu().numpy()
    return out
