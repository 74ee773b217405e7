"""Model backends with one interface: ``generate`` (greedy captions / rewrites) and ``score`` (log-probability
of a given continuation, for PPL and Val_PPL).

- ``TransformersBackend``: any image-text-to-text model id or folder (SmolVLM / Idefics3, Qwen2.5-VL,
  LLaVA-OneVision ...) on CPU or GPU; chat templates from the processor; batched with left padding.
- ``VLLMBackend``: the same calls through ``vllm.LLM`` with multimodal prompts (GPU only;
  ``pip install engine[vllm]``).

Both count the seconds spent inside the model (``model_seconds``) and in the model's own input processor
(``prepare_seconds``: chat template, tokenising, image preprocessing), so stages can report how much of a run
goes to the model, to its processor and to the engine around them (reading, decoding, batching, writing).
"""

from __future__ import annotations

import io
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engine.paths import model_identity


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
    prepare_seconds: float = 0.0

    @abstractmethod
    def generate(self, requests: list[Request], max_new_tokens: int = 96, min_new_tokens: int = 0) -> list[Generation]:
        """Greedy continuations of the chat prompts (``min_new_tokens`` fixes lengths for benchmarks)."""

    @abstractmethod
    def score(self, requests: list[Request], targets: list[str]) -> list[list[float]]:
        """Per-token log-probabilities of each ``target`` as the assistant's reply to its request."""

    @property
    @abstractmethod
    def context_length(self) -> int: ...


def too_long_reason(tokens: int, context: int) -> str:
    """The one wording of a prompt that does not fit the model (a reject reason, or a row's status)."""
    return f"prompt needs {tokens} tokens, more than the model context of {context}"


def run_fitting(call, items: list) -> tuple[list, list[int], dict[int, str]]:
    """The one rule for prompts longer than a model's context: run ``call(items)``; when it raises
    ``PromptTooLong``, leave those items out and run the rest again.

    Returns
    -------
    ``call``'s results for the items that fit, their indices in ``items``, and ``{index: reason}`` for those
    left out (``too_long_reason``).
    """
    kept, dropped = list(range(len(items))), {}
    while kept:
        try:
            return call([items[i] for i in kept]), kept, dropped
        except PromptTooLong as error:
            for index in sorted(error.rows, reverse=True):
                dropped[kept[index]] = too_long_reason(error.rows[index], error.context)
                del kept[index]
    return [], kept, dropped


def decode_images(images: list[bytes]) -> list[Image.Image]:
    """Decode encoded images (raises on a broken one, for the caller to reject the row)."""
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in images]


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _messages(request: Request) -> list[dict]:
    content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}]
    return [{"role": "user", "content": content}]


def _with_adapter(model, adapter: str):
    """``model`` with the peft adapter in folder ``adapter`` (one-line errors for a missing or foreign one)."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a peft adapter folder (no adapter_config.json); "
                                "a --full run wrote a whole model: pass it as --model instead")
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (ValueError, RuntimeError, KeyError) as error:
        raise RuntimeError(f"cannot apply adapter {adapter!r}: {_first_line(error)}") from None


class TransformersBackend(Backend):
    """An image-text-to-text model through ``AutoProcessor`` and ``AutoModelForImageTextToText``."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", processor=None, adapter: str | None = None):
        """``processor``: use this processor instead of the folder's own (for example one built with other
        image sizes). ``adapter``: a peft adapter folder (``engine train`` output) applied on the model, unmerged."""
        import inspect

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not Path(model).exists() and "/" not in model:
            raise FileNotFoundError(f"model {model!r} is neither a local folder nor a hub id (owner/name)")
        try:
            self.processor = processor if processor is not None else AutoProcessor.from_pretrained(model)
            torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype)
            if adapter is not None:
                self.model = _with_adapter(self.model, adapter)
            self.model = self.model.to(device).eval()
        except OSError as error:
            raise FileNotFoundError(f"cannot load model {model!r}: {_first_line(error)}") from None
        except ImportError as error:  # e.g. Qwen2.5-VL's processor needs torchvision for its video part
            sentence = " ".join(str(error).split()).split(". ")[0].rstrip(".")
            raise RuntimeError(f"cannot load model {model!r}: {sentence} (install the missing package)") from None
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching
        self.name, self.device = model_identity(model), device  # one name per model, however it is spelled
        self.model_name = self.name  # the base model, without the adapter
        self.adapter = model_identity(adapter) if adapter else None
        if self.adapter:  # captions and scores of base + adapter are other facts than the base model's
            self.name = f"{self.name}+{self.adapter}"
        self.model_seconds = self.prepare_seconds = 0.0
        base = self.model.get_base_model() if adapter is not None else self.model
        self.trims_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    @property
    def context_length(self) -> int:
        config = getattr(self.model.config, "text_config", self.model.config)
        return int(getattr(config, "max_position_embeddings", None) or self.processor.tokenizer.model_max_length)

    def _prompts(self, requests: list[Request]) -> list[str]:
        return [self.processor.apply_chat_template(_messages(r), add_generation_prompt=True) for r in requests]

    def _inputs(self, requests: list[Request], extra_tokens: list[int] | None = None):
        """Processor inputs for a batch; raises ``PromptTooLong`` naming the rows that do not fit."""
        start = time.perf_counter()
        images = [r.images for r in requests]
        kwargs = {"images": images} if any(images) else {}
        inputs = self.processor(text=self._prompts(requests), return_tensors="pt", padding=True, **kwargs)
        self.prepare_seconds += time.perf_counter() - start
        needed = inputs["attention_mask"].sum(1).tolist()
        extra = extra_tokens or [0] * len(requests)
        too_long = {i: n + e for i, (n, e) in enumerate(zip(needed, extra)) if n + e > self.context_length}
        if too_long:
            raise PromptTooLong(too_long, self.context_length)
        return inputs  # on the CPU: callers move what the model reads

    def generate(self, requests: list[Request], max_new_tokens: int = 96, min_new_tokens: int = 0) -> list[Generation]:
        import torch

        inputs = self._inputs(requests, [max_new_tokens] * len(requests)).to(self.device)
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
        start = time.perf_counter()
        target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        self.prepare_seconds += time.perf_counter() - start
        inputs = self._inputs(requests, [len(t) for t in target_ids])
        # append each target after its prompt, left-padded: [pad ... prompt target]
        prompts, masks = inputs["input_ids"], inputs["attention_mask"].bool()
        lengths = masks.sum(1).tolist()
        width = max(n + len(t) for n, t in zip(lengths, target_ids))
        keep = max(len(t) for t in target_ids) + 1  # only the last positions predict targets
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(requests), width), pad, dtype=prompts.dtype)
        attention = torch.zeros((len(requests), width), dtype=inputs["attention_mask"].dtype)
        wanted = torch.zeros((len(requests), keep - 1), dtype=torch.long)  # the targets, aligned right
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        # other per-token inputs (Qwen2.5-VL's mm_token_type_ids, token_type_ids) move with their tokens; 0 = text
        per_token = {k: v for k, v in extra.items() if torch.is_tensor(v) and v.shape == prompts.shape}
        moved = {k: torch.zeros((len(requests), width), dtype=v.dtype) for k, v in per_token.items()}
        for row, (length, target) in enumerate(zip(lengths, target_ids)):
            tail = torch.tensor(target, dtype=prompts.dtype)
            span = slice(width - len(target) - length, width - len(target))
            input_ids[row, span] = prompts[row][masks[row]]
            input_ids[row, width - len(target) :] = tail
            attention[row, span.start :] = 1
            wanted[row, keep - 1 - len(target) :] = tail
            for name, values in per_token.items():
                moved[name][row, span] = values[row][masks[row]]
        extra = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in {**extra, **moved}.items()}
        if self.trims_logits:
            extra["logits_to_keep"] = keep
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **extra).logits
        self.model_seconds += time.perf_counter() - start
        # the logits at positions -keep .. -2 predict the aligned targets
        log_probs = torch.log_softmax(logits[:, -keep:-1].float(), dim=-1)
        picked = log_probs.gather(-1, wanted.to(log_probs.device).unsqueeze(-1)).squeeze(-1).tolist()
        return [row[keep - 1 - len(target) :] for row, target in zip(picked, target_ids)]


class VLLMBackend(Backend):
    """The same calls through vLLM (CUDA only). Scores come from ``prompt_logprobs`` over the prompt plus
    target, reading the target's tokens."""

    def __init__(self, model: str, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, dtype: str = "auto"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the vLLM backend needs a CUDA GPU; use --backend transformers on this machine")
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(model)
        self.llm = LLM(model=model, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       limit_mm_per_prompt={"image": 4}, dtype=dtype)
        self.name = model_identity(model)
        self.model_seconds = self.prepare_seconds = 0.0

    @property
    def context_length(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _chat(self, request: Request) -> str:
        return self.processor.apply_chat_template(_messages(request), add_generation_prompt=True)

    def _prompt(self, text: str, request: Request) -> dict:
        prompt = {"prompt": text}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images}
        return prompt

    def prompt_length(self, request: Request) -> int:
        kwargs = {"images": [request.images]} if request.images else {}
        return int(self.processor(text=[self._chat(request)], return_tensors="pt", **kwargs)["input_ids"].shape[1])

    def _check(self, requests: list[Request], extra: list[int]) -> None:
        start = time.perf_counter()
        needed = {i: self.prompt_length(r) + e for i, (r, e) in enumerate(zip(requests, extra))}
        self.prepare_seconds += time.perf_counter() - start
        too_long = {i: n for i, n in needed.items() if n > self.context_length}
        if too_long:
            raise PromptTooLong(too_long, self.context_length)

    def generate(self, requests: list[Request], max_new_tokens: int = 96, min_new_tokens: int = 0) -> list[Generation]:
        from vllm import SamplingParams

        self._check(requests, [max_new_tokens] * len(requests))
        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=min_new_tokens)
        outputs = self.llm.generate([self._prompt(self._chat(r), r) for r in requests], params, use_tqdm=False)
        self.model_seconds += time.perf_counter() - start
        return [Generation(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]

    def score(self, requests: list[Request], targets: list[str]) -> list[list[float]]:
        from vllm import SamplingParams

        tokenizer = self.processor.tokenizer
        chats = [self._chat(r) for r in requests]
        # the target's tokens are those that appending it adds (robust to merges at the boundary)
        counts = [len(tokenizer(c + t, add_special_tokens=False)["input_ids"]) - len(tokenizer(c, add_special_tokens=False)["input_ids"])
                  for c, t in zip(chats, targets)]
        self._check(requests, counts)
        start = time.perf_counter()
        outputs = self.llm.generate([self._prompt(c + t, r) for c, t, r in zip(chats, targets, requests)],
                                    SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        self.model_seconds += time.perf_counter() - start
        # prompt_logprobs[i] holds log p(token i | tokens before it), the prompt's own token included
        scores = []
        for output, n in zip(outputs, counts):
            first = len(output.prompt_token_ids) - n  # not [-n:]: an empty target has n = 0
            entries, ids = output.prompt_logprobs[first:], output.prompt_token_ids[first:]
            scores.append([entry[token].logprob for entry, token in zip(entries, ids)])
        return scores


def load_backend(model: str, backend: str = "transformers", device: str = "cpu", dtype: str = "auto",
                 adapter: str | None = None) -> Backend:
    """A backend for a model id or folder; fails at once, with one line, if the model cannot be loaded.
    ``dtype``: "auto" (the model's own), or a torch dtype name such as "bfloat16" or "float32".
    ``adapter``: a peft adapter folder applied on the model (transformers backend)."""
    if backend == "vllm" and adapter is not None:
        raise ValueError("--adapter works with the transformers backend; merge the adapter to serve it with vLLM")
    if backend == "vllm":
        return VLLMBackend(model, dtype=dtype)
    if backend != "transformers":
        raise ValueError(f"unknown backend {backend!r}; choose transformers or vllm")
    return TransformersBackend(model, device, dtype, adapter=adapter)


@dataclass(frozen=True)
class BackendSpec:
    """What ``load_backend`` needs, as a small picklable value: a stage carries it to its workers and loads
    the backend in ``setup()``. ``name`` is the name the model's rows are recorded under, known without
    loading the model."""

    model: str
    backend: str = "transformers"
    device: str = "cpu"
    dtype: str = "auto"
    adapter: str | None = None

    @property
    def name(self) -> str:
        name = model_identity(self.model)
        return f"{name}+{model_identity(self.adapter)}" if self.adapter else name

    def load(self) -> Backend:
        return load_backend(self.model, self.backend, self.device, self.dtype, self.adapter)


def perplexity(log_probs: list[float]) -> float:
    """exp of the mean negative log-likelihood of a continuation's tokens."""
    return math.exp(-sum(log_probs) / max(len(log_probs), 1))
