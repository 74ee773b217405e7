"""Model backends with one interface: ``generate`` (greedy captions / rewrites) and ``score`` (log-probability
of a given continuation, for PPL and Val_PPL).

- ``TransformersBackend``: any image-text-to-text model id or folder (SmolVLM / Idefics3, Qwen2.5-VL,
  LLaVA-OneVision ...) on CPU or GPU; chat templates from the processor; batched with left padding.
- ``VLLMBackend``: the same calls through ``vllm.LLM`` with multimodal prompts (GPU only;
  ``pip install engine[vllm]``).

Both count the seconds spent inside the model (``model_seconds``) so stages can report how much of a run
goes to batching, decoding and writing.
"""

from __future__ import annotations

import io
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Request:
    """One prompt: decoded images and the user text (a chat with a single user turn)."""

    images: list[Image.Image]
    text: str


@dataclass
class Generation:
    text: str
    tokens: int


class PromptTooLong(ValueError):
    """Prompts longer than the model's context: ``rows`` maps batch index -> tokens needed."""

    def __init__(self, rows: dict[int, int], context: int):
        self.rows, self.context = rows, context
        super().__init__(f"{len(rows)} prompts exceed the model context of {context} tokens")


class Backend(ABC):
    name: str
    model_seconds: float = 0.0

    @abstractmethod
    def generate(self, requests: list[Request], max_new_tokens: int = 96, min_new_tokens: int = 0) -> list[Generation]:
        """Greedy continuations of the chat prompts (``min_new_tokens`` fixes lengths for benchmarks)."""

    @abstractmethod
    def score(self, requests: list[Request], targets: list[str]) -> list[list[float]]:
        """Per-token log-probabilities of each ``target`` as the assistant's reply to its request."""

    @property
    @abstractmethod
    def context_length(self) -> int: ...


def decode_images(images: list[bytes]) -> list[Image.Image]:
    """Decode encoded images (raises on a broken one, for the caller to reject the row)."""
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in images]


def _messages(request: Request) -> list[dict]:
    content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}]
    return [{"role": "user", "content": content}]


class TransformersBackend(Backend):
    """An image-text-to-text model through ``AutoProcessor`` and ``AutoModelForImageTextToText``."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not Path(model).exists() and "/" not in model:
            raise FileNotFoundError(f"model {model!r} is neither a local folder nor a hub id (owner/name)")
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).to(device).eval()
        except OSError as error:
            raise FileNotFoundError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching
        self.name, self.device = model, device
        self.model_seconds = 0.0
        import inspect

        self.trims_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @property
    def context_length(self) -> int:
        config = getattr(self.model.config, "text_config", self.model.config)
        return int(getattr(config, "max_position_embeddings", None) or self.processor.tokenizer.model_max_length)

    def _prompts(self, requests: list[Request]) -> list[str]:
        return [self.processor.apply_chat_template(_messages(r), add_generation_prompt=True) for r in requests]

    def _inputs(self, requests: list[Request], extra_tokens: list[int] | None = None):
        """Processor inputs for a batch; raises ``PromptTooLong`` naming the rows that do not fit."""
        images = [r.images for r in requests]
        kwargs = {"images": images} if any(images) else {}
        inputs = self.processor(text=self._prompts(requests), return_tensors="pt", padding=True, **kwargs)
        needed = inputs["attention_mask"].sum(1).tolist()
        extra = extra_tokens or [0] * len(requests)
        too_long = {i: n + e for i, (n, e) in enumerate(zip(needed, extra)) if n + e > self.context_length}
        if too_long:
            raise PromptTooLong(too_long, self.context_length)
        return inputs.to(self.device)

    def generate(self, requests: list[Request], max_new_tokens: int = 96, min_new_tokens: int = 0) -> list[Generation]:
        import torch

        inputs = self._inputs(requests, [max_new_tokens] * len(requests))
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)
        self.model_seconds += time.perf_counter() - start
        new = output[:, inputs["input_ids"].shape[1] :]
        eos = self.processor.tokenizer.eos_token_id
        pad = self.processor.tokenizer.pad_token_id
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        tokens = [int(sum(1 for t in row.tolist() if t not in (eos, pad))) for row in new]
        return [Generation(text.strip(), n) for text, n in zip(texts, tokens)]

    def score(self, requests: list[Request], targets: list[str]) -> list[list[float]]:
        import torch

        tokenizer = self.processor.tokenizer
        target_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        inputs = self._inputs(requests, [len(t) for t in target_ids])
        # append each target after its (left-padded) prompt, then re-pad on the left
        rows = []
        for ids, mask, target in zip(inputs["input_ids"], inputs["attention_mask"], target_ids):
            rows.append(ids[mask.bool()].tolist() + target)
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        keep = max(len(t) for t in target_ids) + 1  # only the last positions predict targets (left padding)
        if self.trims_logits:
            extra["logits_to_keep"] = keep
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention, **extra).logits[:, -keep:]
        self.model_seconds += time.perf_counter() - start
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for row, target in enumerate(target_ids):
            n = len(target)
            positions = torch.arange(keep - n - 1, keep - 1, device=self.device)  # logits that predict the target
            picked = log_probs[row, positions, torch.tensor(target, device=self.device)]
            scores.append(picked.tolist())
        return scores


class VLLMBackend(Backend):
    """The same calls through vLLM (CUDA only). Scores come from ``prompt_logprobs`` over the prompt plus
    target, reading the target's tokens."""

    def __init__(self, model: str, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the vLLM backend needs a CUDA GPU; use --backend transformers on this machine")
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(model)
        self.llm = LLM(model=model, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       limit_mm_per_prompt={"image": 4})
        self.name = model
        self.model_seconds = 0.0

    @property
    def context_length(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _prompt(self, request: Request, suffix: str = "") -> dict:
        text = self.processor.apply_chat_template(_messages(request), add_generation_prompt=True) + suffix
        prompt = {"prompt": text}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images}
        return prompt

    def prompt_length(self, request: Request) -> int:
        text = self.processor.apply_chat_template(_messages(request), add_generation_prompt=True)
        kwargs = {"images": [request.images]} if request.images else {}
        return int(self.processor(text=[text], return_tensors="pt", **kwargs)["input_ids"].shape[1])

    def _check(self, requests: list[Request], extra: int) -> None:
        needed = {i: self.prompt_length(r) + extra for i, r in enumerate(requests)}
        too_long = {i: n for i, n in needed.items() if n > self.context_length}
        if too_long:
            raise PromptTooLong(too_long, self.context_length)

    def generate(self, requests: list[Request], max_new_tokens: int = 96, min_new_tokens: int = 0) -> list[Generation]:
        from vllm import SamplingParams

        self._check(requests, max_new_tokens)
        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=min_new_tokens)
        outputs = self.llm.generate([self._prompt(r) for r in requests], params, use_tqdm=False)
        self.model_seconds += time.perf_counter() - start
        return [Generation(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]

    def score(self, requests: list[Request], targets: list[str]) -> list[list[float]]:
        from vllm import SamplingParams

        tokenizer = self.processor.tokenizer
        self._check(requests, max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets))
        start = time.perf_counter()
        outputs = self.llm.generate([self._prompt(r, t) for r, t in zip(requests, targets)],
                                    SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        self.model_seconds += time.perf_counter() - start
        scores = []
        for output, target in zip(outputs, targets):
            n = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            ids = output.prompt_token_ids[-n:]
            entries = output.prompt_logprobs[-n:]
            scores.append([entry[token].logprob for entry, token in zip(entries, ids)])
        return scores


def load_backend(model: str, backend: str = "transformers", device: str = "cpu") -> Backend:
    """A backend for a model id or folder; fails at once, with one line, if the model cannot be loaded."""
    if backend == "vllm":
        return VLLMBackend(model)
    if backend != "transformers":
        raise ValueError(f"unknown backend {backend!r}; choose transformers or vllm")
    return TransformersBackend(model, device)


def perplexity(log_probs: list[float]) -> float:
    """exp of the mean negative log-likelihood of a continuation's tokens."""
    return math.exp(-sum(log_probs) / max(len(log_probs), 1))
