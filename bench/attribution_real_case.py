"""The real case for `engine attribute`: the tiny SmolVLM-architecture model, trained from scratch on easy-vqa
(PyPI, offline), attributed at two points of its training. Early on it answers from the question alone (a
black image barely changes its answers); later it reads the image. Attribution should say so: U_I inside the
shuffled baseline first, above it later.

Training is a plain loop (AdamW on the answer tokens) so that this script does not depend on `engine train`.

    python bench/attribution_real_case.py [--steps 40 400] [--samples 1500]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.attribution.run import AttributeConfig, attribute
from engine.models.backends import load_backend
from engine.models.backends import Request, decode_images
from engine.models.tiny import build_tiny_smolvlm
from engine.ingest.easyvqa import _image_bytes, image_paths, questions
from engine.store import Store


def load(split: str, limit: int, seed: int) -> list[dict]:
    texts, answers, image_ids = questions(split)
    paths = image_paths(split)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cache: dict[int, bytes] = {}
    rows = []
    for index in order[:limit]:
        image = image_ids[index]
        if image not in cache:
            cache[image] = _image_bytes(paths[image])
        rows.append({"image": cache[image], "question": texts[index], "answer": answers[index]})
    return rows


def black(data: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    out = io.BytesIO()
    Image.new("RGB", image.size, (0, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def accuracy(backend, rows: list[dict], labels: list[str], blank: bool = False, batch: int = 64) -> float:
    """Share of rows whose answer has the highest log-probability among all answer classes."""
    correct = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        requests = [Request(decode_images([black(r["image"]) if blank else r["image"]]), r["question"]) for r in chunk]
        scores = backend.score([q for q in requests for _ in labels], [label for _ in requests for label in labels])
        totals = np.array([sum(s) for s in scores]).reshape(len(chunk), len(labels))
        correct += sum(labels[i] == r["answer"] for i, r in zip(totals.argmax(1), chunk))
    return correct / len(rows)


def train(backend, rows: list[dict], steps: int, batch: int, lr: float, seed: int, optimizer=None):
    model, processor = backend.model, backend.processor
    eos = processor.tokenizer.eos_token
    model.train()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        chunk = rng.sample(rows, batch)
        prompts = backend._prompts([Request([None], r["question"]) for r in chunk])
        answer_ids = [processor.tokenizer(r["answer"] + eos, add_special_tokens=False)["input_ids"] for r in chunk]
        inputs = processor(text=[p + r["answer"] + eos for p, r in zip(prompts, chunk)],
                           images=[decode_images([r["image"]]) for r in chunk], return_tensors="pt", padding=True)
        labels = torch.full_like(inputs["input_ids"], -100)
        for row, ids in enumerate(answer_ids):  # left padding: each answer ends the row
            labels[row, -len(ids) :] = inputs["input_ids"][row, -len(ids) :]
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return optimizer, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 400], help="cumulative steps at which to measure")
    parser.add_argument("--samples", type=int, default=1500, help="test questions to attribute")
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: more threads only contend (10x slower steps here)
    torch.manual_seed(0)
    train_rows, test_rows = load("train", 20000, 0), load("test", args.samples, 1)
    labels = sorted({r["answer"] for r in train_rows})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_smolvlm(Path(tmp) / "model")
        dataset = Path(tmp) / "test" / "test-0.parquet"
        dataset.parent.mkdir()
        pq.write_table(pa.table({
            "images": [[{"bytes": r["image"], "path": None}] for r in test_rows],
            "texts": [[{"user": r["question"], "assistant": r["answer"], "source": "easy_vqa"}] for r in test_rows],
        }), dataset)
        backend = load_backend(str(folder))
        optimizer, done = None, 0
        for steps in args.steps:
            clock = time.perf_counter()
            optimizer, loss = train(backend, train_rows, steps - done, args.batch, args.lr, steps, optimizer)
            done = steps
            trained = Path(tmp) / f"model-{steps}"
            backend.model.save_pretrained(trained)
            backend.processor.save_pretrained(trained)
            seconds = time.perf_counter() - clock
            clean = accuracy(backend, test_rows[: args.eval_rows], labels)
            blind = accuracy(backend, test_rows[: args.eval_rows], labels, blank=True)
            report = attribute(Store(Path(tmp) / f"store-{steps}"), load_backend(str(trained)), dataset=str(dataset.parent),
                               config=AttributeConfig(layers=[1, 2], bootstrap=20, shuffles=10), progress=False)
            for row in report.rows:
                baseline = json.loads(row["baseline"])["mean_and_q95"]
                results.append((steps, loss, seconds, clean, blind, row, baseline))
            print(f"trained to step {steps} (loss {loss:.3f}, {seconds:.0f} s)", flush=True)
    print(f"{'steps':>6}{'acc':>7}{'acc black':>10}{'layer':>6}{'R':>7}{'U_I':>7}{'U_I shuf q95':>13}{'U_T':>7}{'U_T shuf q95':>13}{'S':>7}{'CI':>7}")
    for steps, loss, seconds, clean, blind, row, baseline in results:
        print(f"{steps:>6}{clean:>7.1%}{blind:>10.1%}{row['layer']:>6}{row['R']:>7.3f}{row['U_I']:>7.3f}{baseline['U_I'][1]:>13.3f}"
              f"{row['U_T']:>7.3f}{baseline['U_T'][1]:>13.3f}{row['S']:>7.3f}{row['CI']:>7.1%}")


if __name__ == "__main__":
    main()
