"""Training examples from a built mixture: rows turned into prompt/completion token sequences through the
model's own processor and chat template, originals grouped with their perturbed variants, and a batch sampler
that keeps each group in one micro-batch.

Labels cover the assistant answers of every turn plus the special token that ends each answer (so the model
learns to stop), nothing else: not the prompt, not the image tokens, not padding. A row longer than
``max_length`` is skipped and counted (never truncated, which would cut through image tokens), as is a row with
an empty answer.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.models.backends import decode_images

TASK_KINDS = ("vqa", "image_heavy", "text_heavy")
COLUMNS = ("images", "texts", "sample_id", "task_kind", "origin_id", "perturbation")
IGNORE = -100


class MixtureError(ValueError):
    """A mixture folder that cannot be trained on (printed as one line)."""


class SkipRow(ValueError):
    """A row that cannot become a training example; the message is the reason counted in the manifest."""


def read_mixture(path: str | Path) -> tuple[pa.Table, dict, str]:
    """The rows of a built mixture (its Parquet shards, or its ``hf/`` folder), its manifest and the
    manifest's SHA-256."""
    from engine.recipes.output import ManifestError, read_manifest

    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        manifest, raw_sha256 = read_manifest(path)
    except ManifestError as error:
        raise MixtureError(str(error)) from None
    if "recipe_sha256" not in manifest:
        raise MixtureError(f"{manifest_path}: no recipe_sha256; rebuild the mixture with `engine build`")
    shards = sorted((path / "parquet").glob("part-*.parquet"))
    if shards:
        table = pa.concat_tables([pq.read_table(shard, columns=[c for c in COLUMNS if c in pq.read_schema(shard).names])
                                  for shard in shards])
    elif (path / "hf" / "state.json").is_file():
        import datasets

        table = datasets.load_from_disk(str(path / "hf")).with_format("arrow")[:]
    else:
        raise MixtureError(f"{path} holds neither parquet/ shards nor an hf/ folder")
    missing = [c for c in ("images", "texts", "sample_id") if c not in table.column_names]
    if missing:
        raise MixtureError(f"{path}: the mixture has no column {missing[0]!r}")
    return table, manifest, raw_sha256


def chat_messages(turns: list[dict], n_images: int) -> list[dict]:
    """The conversation in the processor's chat layout: the first user message carries the images (as
    ``engine export --format messages`` writes them), each turn a user and an assistant message."""
    messages = []
    for index, turn in enumerate(turns):
        images = [{"type": "image"} for _ in range(n_images)] if index == 0 else []
        messages.append({"role": "user", "content": images + [{"type": "text", "text": turn["user"] or ""}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["assistant"] or ""}]})
    return messages


def _token_span(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Indices of the tokens lying wholly inside characters [start, end); a token straddling an edge means the
    tokenizer merged the span with its surroundings, and the row cannot be labelled exactly."""
    inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
    straddles = (offsets[:, 0] < start) & (offsets[:, 1] > start) | (offsets[:, 0] < end) & (offsets[:, 1] > end)
    if straddles.any():
        raise SkipRow("a token crosses the edge of an answer or question")
    return np.flatnonzero(inside)


class ChatEncoder:
    """Encodes one row with the model's processor: input tensors, labels and the two perturbation masks.

    Parameters
    ----------
    processor
        The model's processor (chat template, tokenizer, image processor).
    image_token_id
        The token whose positions receive image features.
    max_length
        Rows with more tokens are skipped.
    """

    def __init__(self, processor, image_token_id: int, max_length: int):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.image_token_id, self.max_length = image_token_id, max_length
        self.special = set(self.tokenizer.all_special_ids) | {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def encode(self, images: list, turns: list[dict]) -> dict:
        """Processor outputs (batch of one) plus ``labels``, ``image_mask`` and ``user_mask`` (1-D, per token).
        Raises ``SkipRow`` with the reason when the row cannot be used."""
        if not turns:
            raise SkipRow("no turns")
        if any(not (t["assistant"] or "").strip() for t in turns):
            raise SkipRow("a turn has no answer")
        messages = chat_messages(turns, len(images))
        text = self.render(messages)
        # character spans: each answer runs from the end of its generation prompt to the end of the answer
        answers, questions, cursor = [], [], 0
        for index, turn in enumerate(turns):
            user_at = text.find(turn["user"] or "", cursor)
            if user_at < 0:
                raise SkipRow("the chat template changed the question text")
            questions.append((user_at, user_at + len(turn["user"] or "")))
            prompt = self.render(messages[: 2 * index + 1], generation_prompt=True)
            if not text.startswith(prompt):
                raise SkipRow("the chat template renders a prompt that is not a prefix of the conversation")
            answer_at = text.find(turn["assistant"], len(prompt))
            if answer_at < 0:
                raise SkipRow("the chat template changed the answer text")
            answers.append((len(prompt), answer_at + len(turn["assistant"])))
            cursor = answer_at + len(turn["assistant"])
        kwargs = {"images": [images]} if images else {}
        inputs = self.processor(text=[text], return_tensors="pt", **kwargs)
        ids = inputs["input_ids"][0]
        if len(ids) > self.max_length:
            raise SkipRow(f"longer than max_length ({self.max_length} tokens)")
        # The processor expands image placeholders before tokenising; everything after the last placeholder
        # tokenises identically with or without the expansion (special tokens split the text), so the plain
        # tokenisation's character offsets locate answers and questions, counted from the end of the sequence.
        plain = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain_ids, offsets = np.asarray(plain["input_ids"]), np.asarray(plain["offset_mapping"]).reshape(-1, 2)
        shift = len(ids) - len(plain_ids)
        placeholders = np.flatnonzero(plain_ids == self.image_token_id)
        first_free = int(placeholders[-1]) + 1 if len(placeholders) else 0
        tail = ids[first_free + shift :].numpy()
        if shift < 0 or not np.array_equal(tail, plain_ids[first_free:]):
            raise SkipRow("the processor's tokens do not match the tokenizer's after the images")
        labels = torch.full_like(ids, IGNORE)
        user_mask = torch.zeros(len(ids), dtype=torch.bool)
        for start, end in answers:
            span = _token_span(offsets, start, end)
            if len(span) == 0 or span[0] < first_free:
                raise SkipRow("an answer lies before the images")
            after = span[-1] + 1
            if after >= len(plain_ids) or int(plain_ids[after]) not in self.special:
                raise SkipRow("the chat template puts no special end-of-turn token after the answer")
            span = np.append(span, after)
            labels[span + shift] = ids[span + shift]
        for start, end in questions:
            span = _token_span(offsets, start, end)
            if len(span) and span[0] < first_free:
                raise SkipRow("a question lies before the images")
            user_mask[span + shift] = True
        encoded = dict(inputs)
        encoded["labels"] = labels
        encoded["image_mask"] = ids == self.image_token_id
        encoded["user_mask"] = user_mask & ~encoded["image_mask"]
        return encoded


@dataclass
class Examples:
    """The usable rows of a mixture, their groups, and what was skipped."""

    table: pa.Table
    rows: list[int]  # table row of each example
    groups: list[list[int]]  # example indices; the original first, then its variants
    origin: list[int]  # example index of each example's original, -1 for originals and orphans
    task_kind: list[str]
    lengths: list[int]
    skipped: Counter = field(default_factory=Counter)
    orphans: int = 0  # variants whose original was skipped (trained without a pair)


class MixtureDataset(torch.utils.data.Dataset):
    """Examples encoded on access (images decoded and processed in the data loader, not held in memory)."""

    def __init__(self, examples: Examples, encoder: ChatEncoder):
        self.examples, self.encoder = examples, encoder
        self.images = examples.table.column("images")
        self.texts = examples.table.column("texts")

    def __len__(self) -> int:
        return len(self.examples.rows)

    def encode_row(self, row: int) -> dict:
        images = [i["bytes"] if isinstance(i, dict) else i for i in (self.images[row].as_py() or [])]
        try:
            decoded = decode_images(images)
        except Exception as error:  # PIL raises many types for a broken image
            raise SkipRow(f"image cannot be decoded ({type(error).__name__})") from None
        return self.encoder.encode(decoded, self.texts[row].as_py() or [])

    def __getitem__(self, index: int) -> dict:
        item = self.encode_row(self.examples.rows[index])
        item["index"] = index
        return item


def prepare_examples(table: pa.Table, encoder: ChatEncoder, progress: bool = False) -> tuple[Examples, MixtureDataset]:
    """Encode every row once to find its length and whether it is usable; group originals with variants."""
    from tqdm.auto import tqdm

    examples = Examples(table, [], [], [], [], [])
    dataset = MixtureDataset(examples, encoder)
    kinds = table.column("task_kind").to_pylist() if "task_kind" in table.column_names else ["vqa"] * len(table)
    origins = table.column("origin_id").to_pylist() if "origin_id" in table.column_names else [None] * len(table)
    ids = table.column("sample_id").to_pylist()
    for row in tqdm(range(len(table)), desc="encoding rows", unit="row", disable=not progress):
        try:
            length = len(dataset.encode_row(row)["input_ids"][0])
        except SkipRow as reason:
            examples.skipped[str(reason)] += 1
            continue
        examples.rows.append(row)
        examples.lengths.append(length)
        kind = kinds[row] if kinds[row] in TASK_KINDS else "vqa"
        examples.task_kind.append(kind)
    position = {ids[row]: index for index, row in enumerate(examples.rows)}
    by_group: dict[str, list[int]] = {}
    for index, row in enumerate(examples.rows):
        origin = origins[row]
        if origin is not None and origin not in position:
            examples.orphans += 1
            origin = None
        examples.origin.append(position[origin] if origin is not None else -1)
        by_group.setdefault(origin if origin is not None else ids[row], []).append(index)
    # the original first, then its variants in mixture order
    examples.groups = [sorted(members, key=lambda i: (examples.origin[i] != -1, i)) for members in by_group.values()]
    return examples, dataset


class GroupBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of ``groups_per_batch`` whole groups, so an original and its variants always share a
    micro-batch (and, as accelerate hands whole batches to ranks, a rank). Groups are shuffled by ``seed`` and
    the epoch: the same seed gives the same order."""

    def __init__(self, groups: list[list[int]], groups_per_batch: int, seed: int, shuffle: bool = True):
        self.groups, self.groups_per_batch, self.seed, self.shuffle = groups, groups_per_batch, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.groups) / self.groups_per_batch)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups)) if self.shuffle \
            else np.arange(len(self.groups))
        for start in range(0, len(order), self.groups_per_batch):
            yield [index for g in order[start : start + self.groups_per_batch] for index in self.groups[g]]


PER_TOKEN_PAD = {"input_ids": None, "labels": IGNORE}  # None: the tokenizer's pad id; other per-token inputs pad with 0


def collate_rows(items: list[dict], pad_id: int) -> dict:
    """Stack single-row encodings into a right-padded batch. Per-token tensors are padded to the longest row;
    image tensors are stacked as the model expects them: Qwen2.5-VL's flattened patches (with
    ``image_grid_thw``) concatenated, others padded along their image/tile axis."""
    width = max(len(item["input_ids"][0]) for item in items)
    batch = {}
    flat_images = "image_grid_thw" in items[0]
    for key in items[0]:
        if key in ("index", "image_mask", "user_mask", "labels") or not torch.is_tensor(items[0][key]):
            continue
        values = [item[key] for item in items]
        if values[0].dim() == 2 and values[0].shape == items[0]["input_ids"].shape:  # per-token
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.stack([torch.nn.functional.pad(v[0], (0, width - v.shape[1]), value=fill) for v in values])
        elif flat_images and key in ("pixel_values", "image_grid_thw"):
            batch[key] = torch.cat(values)
        elif values[0].dim() >= 2 and values[0].shape[0] == 1:
            most = max(v.shape[1] for v in values)
            batch[key] = torch.cat([torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, most - v.shape[1])) for v in values])
        else:
            batch[key] = torch.cat(values)
    for key, fill in (("labels", IGNORE), ("image_mask", False), ("user_mask", False)):
        batch[key] = torch.stack([torch.nn.functional.pad(item[key], (0, width - len(item[key])), value=fill) for item in items])
    batch["attention_mask"] = torch.stack([torch.nn.functional.pad(torch.ones(len(i["input_ids"][0]), dtype=torch.long),
                                                                   (0, width - len(i["input_ids"][0]))) for i in items])
    return batch


def perturbation_mask(batch: dict, task_kinds: list[str]) -> torch.Tensor:
    """Where PGD may act (Diagnosing and Mitigating Modality Interference, §4.1): the image tokens of a
    text-heavy row, the user's question tokens of an image-heavy row (not the answer, the template's special
    tokens or padding), nothing on a VQA row."""
    rows = torch.tensor([kind == "text_heavy" for kind in task_kinds])[:, None]
    image_rows = torch.tensor([kind == "image_heavy" for kind in task_kinds])[:, None]
    return (batch["image_mask"] & rows) | (batch["user_mask"] & image_rows)


class GroupCollator:
    """Collates a micro-batch of examples; with ``adversarial`` also the sub-batch of non-VQA rows (VQA rows
    are not duplicated into the adversarial pass)."""

    def __init__(self, examples: Examples, pad_id: int, adversarial: bool):
        self.examples, self.pad_id, self.adversarial = examples, pad_id, adversarial

    def __call__(self, items: list[dict]) -> dict:
        indices = [item["index"] for item in items]
        kinds = [self.examples.task_kind[i] for i in indices]
        batch = collate_rows(items, self.pad_id)
        where = {index: row for row, index in enumerate(indices)}
        # a variant's original in this micro-batch (-1: an original, or an orphan)
        batch["origin_row"] = torch.tensor([where.get(self.examples.origin[i], -1) for i in indices])
        mask = perturbation_mask(batch, kinds)
        batch.pop("image_mask")
        batch.pop("user_mask")
        if self.adversarial:
            chosen = [row for row, kind in enumerate(kinds) if kind != "vqa" and bool(mask[row].any())]
            batch["adv_rows"] = torch.tensor(chosen, dtype=torch.long)
            if chosen:
                sub = collate_rows([items[r] for r in chosen], self.pad_id)
                sub_mask = perturbation_mask(sub, [kinds[r] for r in chosen])
                sub.pop("image_mask")
                sub.pop("user_mask")
                batch["adv_labels"] = sub.pop("labels")
                batch["adv_mask"] = sub_mask
                batch["adv_inputs"] = sub
        return batch
