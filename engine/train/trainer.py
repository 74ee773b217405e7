"""``engine train``: LoRA (or full) fine-tuning of a vision-language model on a built mixture, with the
modality-interference objective, on transformers' ``Trainer`` (so ``accelerate launch`` gives DDP, DeepSpeed and
FSDP without code changes).

Methods (the ablation rows of "Diagnosing and Mitigating Modality Interference", Table 2):
``sft`` CE on every row; ``consistency`` CE + w·consistency(original, variant); ``adversarial`` CE + CE_adv;
``full`` CE + CE_adv + w·consistency over the heuristic and the adversarial pairs.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.train.data import (ChatEncoder, GroupBatchSampler, GroupCollator, MixtureError, prepare_examples,
                               read_mixture)
from engine.train.objective import (answer_logits, answer_rows, consistency, cross_entropy, embedding_perturbation,
                                    merged_embeddings, pgd_perturbation, without_vision)

METHODS = ("sft", "consistency", "adversarial", "full")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("lm", "connector", "vision")
# modules that map vision features into the language model's input space: Idefics3's connector, LLaVA's projector
# and image-newline embedding, Qwen2.5-VL's patch merger (inside ``visual``)
CONNECTOR_MODULES = ("connector", "multi_modal_projector", "image_newline", "merger")


class TrainError(RuntimeError):
    """A run that cannot start (printed as one line)."""


@dataclass
class TrainConfig:
    """Every knob of ``engine train``; defaults are the papers' (App. D of the interference paper for the
    objective, App. C.1 of the self-captioning paper for LoRA SFT; LoRA rank/alpha/dropout from the SmolVLM
    fine-tuning recipe those runs built on)."""

    method: str = "sft"
    full: bool = False  # full fine-tuning instead of LoRA
    parts: tuple[str, ...] = ("lm",)  # with ``full``: the trainable parts, from PARTS
    learning_rate: float = 5e-5
    part_lr: dict = field(default_factory=dict)  # per-part learning rates (part -> lr); others use learning_rate
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    batch_size: int = 8  # groups (an original with its variants) per micro-batch and device
    effective_batch: int = 64  # groups per optimizer step, through gradient accumulation
    max_steps: int = -1
    max_length: int | None = None  # default: the model's context
    consistency: str = "js"
    consistency_weight: float = 0.01
    temperature: float = 1.0
    anchor_gradient: bool = False
    pgd_alpha: float = 0.1
    pgd_epsilon: float = 1e-3
    pgd_steps: int = 2
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    lora_modules: tuple[str, ...] = LORA_MODULES
    weight_decay: float = 0.0
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int = 2
    resume: bool = False
    device: str = "auto"  # auto: CUDA when present
    bf16: bool | None = None  # None: on GPU
    gradient_checkpointing: bool | None = None  # None: on GPU
    num_workers: int = 0
    logging_steps: int = 1
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.consistency not in ("js", "kl"):
            raise TrainError(f"unknown consistency {self.consistency!r}; choose js or kl")
        if self.batch_size < 1 or self.effective_batch < 1:
            raise TrainError("batch sizes must be positive")
        if self.method in ("adversarial", "full") and (self.pgd_epsilon <= 0 or self.pgd_steps < 0):
            raise TrainError("--pgd-epsilon must be positive and --pgd-steps non-negative")
        if self.temperature <= 0:
            raise TrainError("--temperature must be positive")
        unknown = [part for part in (*self.parts, *self.part_lr) if part not in PARTS]
        if unknown:
            raise TrainError(f"unknown model part {unknown[0]!r}; choose from {', '.join(PARTS)}")
        if not self.parts:
            raise TrainError("--train names no part; choose from " + ", ".join(PARTS))
        if not self.full and tuple(self.parts) != ("lm",):
            raise TrainError("--train connector/vision needs --full (LoRA adapts the language model only)")
        idle = [part for part in self.part_lr if part not in self.parts]
        if idle:
            raise TrainError(f"--part-lr {idle[0]}: that part is not trained (--train {','.join(self.parts)})")
        if any(not (lr > 0) for lr in self.part_lr.values()):
            raise TrainError("--part-lr learning rates must be positive")

    @property
    def uses_consistency(self) -> bool:
        return self.method in ("consistency", "full")

    @property
    def uses_adversarial(self) -> bool:
        return self.method in ("adversarial", "full")


def _image_token_id(model) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise TrainError(f"{type(model).__name__}: the config names no image token")


def _module_name(root, module) -> str:
    return next(name for name, candidate in root.named_modules() if candidate is module)


def language_model_prefix(model) -> str:
    """The qualified name of the language model inside the VLM (``model.text_model`` for Idefics3,
    ``model.language_model`` for Qwen2.5-VL and LLaVA-OneVision)."""
    return _module_name(model, model.get_decoder())


def lora_target_regex(model, modules: tuple[str, ...]) -> str:
    """A regex peft fully matches against module names: the projections of the language model only. Matching
    by suffix alone would also adapt the vision encoder, whose attention has q_proj/k_proj/v_proj too."""
    return rf"{re.escape(language_model_prefix(model))}\..*\.({'|'.join(map(re.escape, modules))})"


def parameter_parts(model) -> dict[str, str]:
    """Each parameter's part: ``lm`` (the language model and its head), ``connector`` (what maps vision features
    into the language model's input space) or ``vision`` (the rest: the vision tower)."""
    prefix = language_model_prefix(model)
    head = _module_name(model, model.get_output_embeddings())
    parts = {}
    for name, _ in model.named_parameters():
        if name.startswith(prefix + ".") or name.startswith(head + "."):
            parts[name] = "lm"
        elif any(component in CONNECTOR_MODULES for component in name.split(".")):
            parts[name] = "connector"
        else:
            parts[name] = "vision"
    return parts


def prepare_model(model, config: TrainConfig):
    """Wrap ``model`` for training: LoRA on the language model's projections, or (``full``) every parameter of
    the chosen parts (default: the language model and its head) trainable, the others frozen."""
    if config.full:
        parts = parameter_parts(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(parts[name] in config.parts)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_target_regex(model, config.lora_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def make_trainer_class():
    """The ``Trainer`` subclass (built lazily: transformers is imported only when training)."""
    from transformers import Trainer

    class InterferenceTrainer(Trainer):
        """``Trainer`` with the interference objective in ``compute_loss`` and group-aware batches."""

        def __init__(self, *args, objective: TrainConfig, sampler: GroupBatchSampler, **kwargs):
            super().__init__(*args, **kwargs)
            self.objective, self.group_sampler = objective, sampler
            self.model_accepts_loss_kwargs = False  # per-micro-batch means, divided by the accumulation steps
            self.terms: dict[str, list[float]] = {}

        def get_train_dataloader(self):
            from torch.utils.data import DataLoader

            loader = DataLoader(self.train_dataset, batch_sampler=self.group_sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def create_optimizer(self, model=None):
            """The configured optimizer with one parameter group per part that has its own learning rate."""
            if self.optimizer is not None or not self.objective.part_lr:
                return super().create_optimizer(model)
            target = self.accelerator.unwrap_model(self.model if model is None else model)
            parts = parameter_parts(target)
            optimizer_class, kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            decay = set(self.get_decay_parameter_names(target))
            groups: dict[tuple, list] = {}
            for name, parameter in target.named_parameters():
                if parameter.requires_grad:
                    lr = self.objective.part_lr.get(parts[name], self.args.learning_rate)
                    wd = self.args.weight_decay if name in decay else 0.0
                    groups.setdefault((lr, wd), []).append(parameter)
            self.optimizer = optimizer_class([{"params": params, "lr": lr, "weight_decay": wd}
                                              for (lr, wd), params in groups.items()], **kwargs)
            return self.optimizer

        def _note(self, name: str, value: float) -> None:
            self.terms.setdefault(name, []).append(value)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            objective = self.objective
            origin_row = inputs.pop("origin_row")
            adv_rows = inputs.pop("adv_rows", None)
            adv_inputs = inputs.pop("adv_inputs", None)
            adv_labels, adv_mask = inputs.pop("adv_labels", None), inputs.pop("adv_mask", None)
            labels = inputs.pop("labels")
            logits, targets = answer_logits(model, inputs, labels)
            loss = ce = cross_entropy(logits, targets)
            self._note("ce", float(ce.detach()))
            self._note("rows", float(len(labels)))
            pairs = []
            if objective.uses_consistency:
                for row, origin in enumerate(origin_row.tolist()):
                    if origin < 0:
                        continue
                    p, p_tokens = answer_rows(logits, targets, origin)
                    q, q_tokens = answer_rows(logits, targets, row)
                    if torch.equal(p_tokens, q_tokens):
                        pairs.append((p, q))
            if objective.uses_adversarial and adv_inputs is not None:
                # PGD passes run on the unwrapped model: they need no gradient sync, and DDP allows one
                # wrapped forward per backward
                bare = self.accelerator.unwrap_model(model)
                base = merged_embeddings(bare, adv_inputs)  # the vision side runs once, not K + 2 times
                delta, stats = pgd_perturbation(bare, adv_inputs, adv_labels, adv_mask, objective.pgd_epsilon,
                                                objective.pgd_alpha, objective.pgd_steps, base)
                with embedding_perturbation(bare, delta, adv_mask, base):
                    adv_logits, adv_targets = answer_logits(bare, without_vision(adv_inputs), adv_labels)
                ce_adv = cross_entropy(adv_logits, adv_targets)
                loss = loss + ce_adv
                clean_adv = cross_entropy(*_rows_of(logits, targets, adv_rows))
                self._note("ce_adv", float(ce_adv.detach()))
                self._note("adv_gap", float(ce_adv.detach() - clean_adv.detach()))
                self._note("step_ratio", stats.step_ratio)
                self._note("delta_max", stats.delta_max)
                if objective.method == "full":
                    for sub, row in enumerate(adv_rows.tolist()):
                        p, p_tokens = answer_rows(logits, targets, row)
                        q, q_tokens = answer_rows(adv_logits, adv_targets, sub)
                        if torch.equal(p_tokens, q_tokens):
                            pairs.append((p, q))
            if objective.uses_consistency:
                term = consistency(pairs, objective.consistency, objective.temperature, objective.anchor_gradient)
                if term is not None:
                    loss = loss + objective.consistency_weight * term
                    self._note("consistency", float(term.detach()))
                self._note("pairs", float(len(pairs)))
            return loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs and self.terms:
                rows = self.terms.pop("rows", [])
                pairs = self.terms.pop("pairs", None)
                logs.update({name: sum(values) / len(values) for name, values in self.terms.items()})
                logs["rows"] = int(sum(rows))
                if pairs is not None:
                    logs["pairs"] = int(sum(pairs))
                self.terms = {}
            super().log(logs, *args, **kwargs)

    return InterferenceTrainer


def _trainable_by_part(model, config: TrainConfig) -> dict[str, int]:
    """Trainable parameter counts per part (LoRA: the adapter's, under ``lm``)."""
    if not config.full:
        return {"lm": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    parts = parameter_parts(model)
    counts = {part: 0 for part in config.parts}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            counts[parts[name]] += parameter.numel()
    return counts


def _rows_of(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor):
    return logits[rows], targets[rows]


def make_progress_callback():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A progress bar showing samples/s and the running loss terms."""

        def __init__(self):
            self.bar, self.rows, self.start = None, 0, None

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is None or not logs or "loss" not in logs:
                return
            self.rows += logs.get("rows", 0)
            rate = self.rows / max(time.perf_counter() - self.start, 1e-9)
            shown = {"samples/s": f"{rate:.2f}", **{k: f"{logs[k]:.4g}" for k in ("ce", "ce_adv", "consistency") if k in logs}}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Progress


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("engine", "torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def load_model(model_id: str, device: str, dtype: str, processor=None):
    """The model and processor through the generation backend's loader (one-line errors)."""
    from engine.models.backends import TransformersBackend

    try:
        backend = TransformersBackend(model_id, "cpu", dtype, processor=processor)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        raise TrainError(str(error)) from None
    backend.processor.tokenizer.padding_side = "right"
    return backend.model, backend.processor


def train(mixture: str | Path, model_id: str, out: str | Path, config: TrainConfig | None = None, processor=None,
          progress: bool = True) -> dict:
    """Train on a built mixture and write to ``out``: the peft adapter (or, with ``full``, the whole model),
    the processor, ``train_manifest.json`` and ``loss.png``. Returns the train manifest.

    ``processor``: use this processor instead of the model folder's own (tests build one where the folder's
    needs torchvision)."""
    config = config or TrainConfig()
    config.check()
    out = Path(out)
    table, mixture_manifest, manifest_sha = read_mixture(mixture)
    checkpoints = out / "checkpoints"
    if config.resume and not any(checkpoints.glob("checkpoint-*")):
        raise TrainError(f"--resume: {checkpoints} holds no checkpoint to resume from")
    if not config.resume and any(checkpoints.glob("checkpoint-*")):
        raise TrainError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    cuda = torch.cuda.is_available() if config.device == "auto" else config.device.startswith("cuda")
    bf16 = cuda if config.bf16 is None else config.bf16
    checkpointing = cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    from transformers import TrainingArguments, set_seed

    model, processor = load_model(model_id, "cpu", "bfloat16" if bf16 else "float32", processor)
    text_config = getattr(model.config, "text_config", model.config)
    max_length = config.max_length or int(getattr(text_config, "max_position_embeddings", 0) or processor.tokenizer.model_max_length)
    encoder = ChatEncoder(processor, _image_token_id(model), max_length)
    examples, dataset = prepare_examples(table, encoder, progress)
    if not examples.rows:
        reasons = ", ".join(f"{n} x {r}" for r, n in examples.skipped.most_common())
        raise TrainError(f"no usable rows in {mixture} ({reasons or 'the mixture is empty'})")
    set_seed(config.seed)  # LoRA's initial weights
    model = prepare_model(model, config)
    trainable = _trainable_by_part(model, config)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    collator = GroupCollator(examples, pad_id, config.uses_adversarial)
    sampler = GroupBatchSampler(examples.groups, config.batch_size, config.seed)
    import accelerate

    world = accelerate.PartialState().num_processes
    accumulation = max(1, math.ceil(config.effective_batch / (config.batch_size * world)))
    args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_ratio, num_train_epochs=config.epochs,
        max_steps=config.max_steps, weight_decay=config.weight_decay, lr_scheduler_type="linear", seed=config.seed,
        data_seed=config.seed, bf16=bf16, use_cpu=not cuda, **_checkpointing_arguments(checkpointing),
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps, report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=config.num_workers, save_only_model=False)
    Trainer = make_trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, objective=config, sampler=sampler)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.add_callback(make_progress_callback()())
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=True if config.resume else None)
    except ValueError as error:
        if "checkpoint" in str(error).lower():
            raise TrainError(str(error).splitlines()[0]) from None
        raise
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return {}
    out.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out)
    _save_processor(processor, out)
    steps = [entry for entry in trainer.state.log_history if "ce" in entry]
    manifest = {
        "mixture": str(Path(mixture).resolve()), "mixture_manifest_sha256": manifest_sha,
        "recipe_sha256": mixture_manifest.get("recipe_sha256"), "model": model_id,
        "config": {**asdict(config), "lora_modules": list(config.lora_modules), "parts": list(config.parts),
                   "gradient_accumulation_steps": accumulation,
                   "world_size": world, "bf16": bf16, "gradient_checkpointing": checkpointing, "max_length": max_length,
                   "lora_target_modules": None if config.full else lora_target_regex(model.get_base_model(), config.lora_modules)},
        "versions": _versions(),
        "rows": {"mixture": len(table), "used": len(examples.rows), "skipped": dict(examples.skipped.most_common()),
                 "groups": len(examples.groups), "pairs": sum(1 for o in examples.origin if o >= 0),
                 "variants_without_original": examples.orphans,
                 "by_task_kind": {k: examples.task_kind.count(k) for k in sorted(set(examples.task_kind))}},
        "trainable_parameters": trainable,
        "steps": [{k: v for k, v in entry.items()} for entry in steps],
        "global_step": trainer.state.global_step, "seconds": seconds,
    }
    (out / "train_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    plot_losses(steps, out / "loss.png")
    return manifest


def _checkpointing_arguments(enabled: bool) -> dict:
    """Non-reentrant activation checkpointing (PGD needs input gradients through the checkpoints), under the
    argument names of the installed transformers (``activation_checkpointing`` from 5.x on)."""
    import inspect

    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _save_processor(processor, out: Path) -> None:
    """The processor next to the adapter; a processor assembled without its video part (no torchvision) saves
    its tokenizer and image processor, as hub folders hold them."""
    try:
        processor.save_pretrained(out)
    except Exception:  # noqa: BLE001 - any failure falls back to the parts
        processor.tokenizer.save_pretrained(out)
        processor.image_processor.save_pretrained(out)


def plot_losses(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in ("ce", "ce_adv", "consistency"):
        points = [(s["step"], s[name]) for s in steps if name in s]
        if points:
            axis.plot(*zip(*points), label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
