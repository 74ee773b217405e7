"""Training throughput of ``engine train``: samples/s and peak memory of sft / consistency / adversarial / full,
against plain TRL ``SFTTrainer`` (LoRA on the same modules, the same rows, prompt/completion loss) as the baseline.

Models are built from config (``engine.models.tiny``): the tiny Idefics3 and one with SmolVLM-256M's layer
sizes (random weights, honest compute). The rows are the bundled sample built with the interference recipe, so
a quarter of the image-heavy and text-heavy rows come with a perturbed variant. Each contender runs in its own
process (clean peak memory); on CPU peak memory is the process's peak RSS, on GPU the peak CUDA allocation.

    python bench/bench_train.py                       # tiny and smolvlm-256m, CPU
    python bench/bench_train.py --sizes tiny --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONTENDERS = ("trl-sft", "sft", "consistency", "adversarial", "full")


def prepare(root: Path, budget: int) -> Path:
    """The bundled sample at a tenth of its size, built with the interference recipe (budget rows)."""
    from engine.stages.ingest import ingest_sample
    from engine.recipes import build, load_recipe
    from engine.store import Store

    store = Store(root / "store")
    ingest_sample(store, root / "sample", scale=0.1, progress=False)
    recipe = load_recipe(REPO / "recipes" / "cauldron_interference.yaml",
                         [f"mixture.budget={budget}", f"output.path={root / 'mixture'}"])
    return build(store, recipe, progress=False).path


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(method: str, mixture: Path, model: str, steps: int, batch: int, out: Path) -> dict:
    from engine.train import TrainConfig, train

    manifest = train(mixture, model, out, TrainConfig(method=method, max_steps=steps, batch_size=batch, effective_batch=batch,
                                                       save_steps=10**9, warmup_ratio=0.0), progress=False)
    rows = sum(s["rows"] for s in manifest["steps"])
    return {"rows": rows, "seconds": manifest["seconds"]}


def run_trl(mixture: Path, model: str, steps: int, batch: int, out: Path) -> dict:
    """Plain TRL: prompt/completion rows with images, LoRA on the language model's projections."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from engine.models.backends import decode_images
    from engine.train.data import chat_messages, read_mixture
    from engine.train.trainer import LORA_MODULES, lora_target_regex

    table, _, _ = read_mixture(mixture)
    records = []
    for images, texts in zip(table.column("images").to_pylist(), table.column("texts").to_pylist()):
        messages = chat_messages(texts, len(images))
        records.append({"images": decode_images([i["bytes"] for i in images]), "prompt": messages[:-1], "completion": messages[-1:]})
    dataset = datasets.Dataset.from_list(records)
    processor = AutoProcessor.from_pretrained(model)
    base = AutoModelForImageTextToText.from_pretrained(model)
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=lora_target_regex(base, LORA_MODULES), task_type="CAUSAL_LM")
    import torch

    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-5, max_length=None,
                       report_to=[], save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(),
                       bf16=torch.cuda.is_available(), disable_tqdm=True, seed=42)
    trainer = SFTTrainer(model=base, args=config, train_dataset=dataset, processing_class=processor, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    return {"rows": steps * batch, "seconds": time.perf_counter() - start}


def worker(contender: str, mixture: str, model: str, steps: int, batch: int) -> None:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{contender}-"))
    if contender == "trl-sft":
        result = run_trl(Path(mixture), model, steps, batch, out)
    else:
        result = run_engine(contender, Path(mixture), model, steps, batch, out)
    result["peak_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "smolvlm-256m"])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run on the tiny model")
    parser.add_argument("--big-steps", type=int, default=3, help="optimizer steps per run at SmolVLM-256M's size")
    parser.add_argument("--batch-size", type=int, default=4, help="groups (engine) / rows (TRL) per step")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender, interleaved; the best is shown")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    parser.add_argument("--worker", nargs=5, metavar=("CONTENDER", "MIXTURE", "MODEL", "STEPS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        contender, mixture, model, steps, batch = args.worker
        worker(contender, mixture, model, int(steps), int(batch))
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    from engine.models.tiny import build_tiny_smolvlm

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    mixture = prepare(root, args.budget)
    print(f"{'model':<14}{'contender':<13}{'rows':>6}{'seconds':>9}{'samples/s':>11}{'x trl-sft':>11}{'x sft time':>11}{'peak MB':>9}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    for size in args.sizes:
        model = str(build_tiny_smolvlm(root / size, context=1024, size=size))
        steps = args.steps if size == "tiny" else args.big_steps
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # round robin, best of the repeats: the machine is shared and noisy
            for contender in CONTENDERS:
                done = subprocess.run([sys.executable, __file__, "--worker", contender, str(mixture), model, str(steps),
                                       str(args.batch_size)], capture_output=True, text=True, env=env)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{size:<14}{contender:<13} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                    continue
                result = json.loads(line[7:])
                result["rate"] = result["rows"] / result["seconds"]
                if contender not in best or result["rate"] > best[contender]["rate"]:
                    best[contender] = result
        for contender, result in best.items():
            rate = result["rate"]
            versus_trl = f"{rate / best['trl-sft']['rate']:.2f}" if "trl-sft" in best else "-"
            # time per row relative to sft: how much longer the same rows take
            versus_sft = f"{best['sft']['rate'] / rate:.2f}" if "sft" in best and contender != "trl-sft" else "-"
            print(f"{size:<14}{contender:<13}{result['rows']:>6}{result['seconds']:>9.2f}{rate:>11.2f}{versus_trl:>11}{versus_sft:>11}"
                  f"{result['peak_mb']:>9.0f}", flush=True)

if __name__ == "__main__":
    main()
