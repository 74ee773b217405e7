"""The LSMI estimator (Self-Captioning MI Tuning, §4.1.2, Algorithm 3, App. B): pointwise r, u_v, u_t, s of
every sample from frozen image and text embeddings and a discrete label.

1. Standardise both modalities with train-fold statistics.
2. Entropy models h(x_V), h(x_T): one KNIFE per modality, trained together on the summed NLL.
3. Classifiers p(y|x_V), p(y|x_T), p(y|x_V, x_T): three MLPs (in -> 512 -> 512 -> classes, ReLU)
   trained together on the summed cross-entropy.
4. i(x_m; y) = log p(y|x_m) - log p(y), with p(y) the label frequency in the train fold (App. A);
   i+ = h(x_m), i- = h(x_m) + log p(y) - log p(y|x_m); then ``pid.decompose``.

Adam (lr 1e-3) with a step LR schedule, batch 64, early stopping on the val fold (min delta 1e-4,
patience 5, best weights restored), at most 30 classifier and 80 entropy epochs; seeded. All in nats.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.interactions.knife import KNIFE
from engine.interactions.pid import TERMS, decompose, dominant


@dataclass
class LSMIConfig:
    components: int = 6
    hidden: int = 512
    learning_rate: float = 1e-3
    batch_size: int = 64
    classifier_epochs: int = 30
    entropy_epochs: int = 80
    patience: int = 5
    min_delta: float = 1e-4
    lr_step_epochs: int = 10  # StepLR: the rate halves every this many epochs
    lr_gamma: float = 0.5
    entropy_max_rows: int | None = 20_000  # KNIFE trains on at most this many train rows (None: all)
    seed: int = 42
    device: str = "cpu"


@dataclass
class LSMIResult:
    """Pointwise values (arrays aligned with the input rows) and how training went."""

    pointwise: dict[str, np.ndarray]
    dominant: np.ndarray
    info: dict = field(default_factory=dict)

    def averages(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """Dataset-level R, U_V, U_T, S (and the other terms): means over the rows in ``mask``."""
        mask = np.ones(len(self.dominant), bool) if mask is None else mask
        return {name: float(values[mask].mean()) for name, values in self.pointwise.items()}


def entropy_rows(train_idx: np.ndarray, val_idx: np.ndarray, config: LSMIConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rows KNIFE trains on and the rows its early stopping watches: with ``entropy_max_rows`` set, a
    seeded random draw of at most that many train rows and a quarter as many val rows (rows come in
    sample-id order, so the first rows would be the first subsets only); otherwise all of both."""
    if not config.entropy_max_rows:
        return train_idx, val_idx
    rng = np.random.default_rng(config.seed)
    draw = lambda rows, n: np.sort(rng.choice(rows, n, replace=False)) if len(rows) > n else rows  # noqa: E731
    return draw(train_idx, config.entropy_max_rows), draw(val_idx, max(config.entropy_max_rows // 4, 1))


def _mlp(inputs: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _train(module: nn.Module, loss_fn, train: tuple, val: tuple, epochs: int, config: LSMIConfig,
           generator: torch.Generator, label: str, progress: bool) -> dict:
    """Adam + StepLR with early stopping on the validation loss; restores the best weights."""
    optimiser = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=config.lr_step_epochs, gamma=config.lr_gamma)
    n = len(train[0])
    best, best_state, stale, history = float("inf"), copy.deepcopy(module.state_dict()), 0, []
    bar = tqdm(range(epochs), desc=label, unit="epoch", disable=not progress)
    for epoch in bar:
        module.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(*(t[index] for t in train))
            loss.backward()
            optimiser.step()
        schedule.step()
        module.eval()
        with torch.no_grad():
            val_loss = float(sum(loss_fn(*(t[i : i + 4096] for t in val)) * len(val[0][i : i + 4096])
                                 for i in range(0, len(val[0]), 4096)) / len(val[0]))
        history.append(val_loss)
        bar.set_postfix(val=f"{val_loss:.4f}")
        if val_loss < best - config.min_delta:
            best, best_state, stale = val_loss, copy.deepcopy(module.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    module.load_state_dict(best_state)
    return {"epochs": len(history), "best_val_loss": best, "val_loss": history}


class _Entropies(nn.Module):
    def __init__(self, x_v: torch.Tensor, x_t: torch.Tensor, config: LSMIConfig, generator: torch.Generator):
        super().__init__()
        pick = lambda x: x[torch.randperm(len(x), generator=generator)[: config.components]]  # noqa: E731
        self.image = KNIFE(pick(x_v), generator=generator)
        self.text = KNIFE(pick(x_t), generator=generator)

    def loss(self, x_v, x_t):
        return -(self.image.log_prob(x_v).mean() + self.text.log_prob(x_t).mean())


class _Classifiers(nn.Module):
    def __init__(self, d_v: int, d_t: int, classes: int, hidden: int):
        super().__init__()
        self.image, self.text, self.joint = _mlp(d_v, hidden, classes), _mlp(d_t, hidden, classes), _mlp(d_v + d_t, hidden, classes)
        self.cross_entropy = nn.CrossEntropyLoss()

    def logits(self, x_v, x_t):
        return self.image(x_v), self.text(x_t), self.joint(torch.cat([x_v, x_t], dim=1))

    def loss(self, x_v, x_t, y):
        return sum(self.cross_entropy(logits, y) for logits in self.logits(x_v, x_t))


def estimate(x_v: np.ndarray, x_t: np.ndarray, labels: np.ndarray, folds: np.ndarray,
             config: LSMIConfig | None = None, progress: bool = True) -> LSMIResult:
    """Fit the LSMI estimator on the ``train`` fold (early stopping on ``val``) and score every row.

    Parameters
    ----------
    x_v, x_t
        (N, d_V) and (N, d_T) embeddings.
    labels
        (N,) discrete labels (any hashable values).
    folds
        (N,) ``"train"``, ``"val"`` or ``"test"`` per row.
    """
    config = config or LSMIConfig()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    folds = np.asarray(folds)
    train, val = folds == "train", folds == "val"
    if train.sum() < 2 or val.sum() < 1:
        raise ValueError(f"need train and val rows, got {int(train.sum())} train and {int(val.sum())} val")
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    # standardise with train statistics (KNIFE's scales are bounded to [1/e, e])
    def standardise(x):
        x = np.asarray(x, dtype=np.float32)
        mean, std = x[train].mean(0), x[train].std(0)
        return torch.from_numpy((x - mean) / np.maximum(std, 1e-6)).to(config.device)

    v, t = standardise(x_v), standardise(x_t)
    target = torch.from_numpy(y.astype(np.int64)).to(config.device)
    # p(y): label frequency in the train fold (a class unseen in train counts once, to stay finite)
    counts = np.bincount(y[train], minlength=len(classes)).astype(np.float64)
    log_prior = np.log(np.maximum(counts, 1.0) / counts.sum())

    train_idx, val_idx = np.flatnonzero(train), np.flatnonzero(val)
    entropy_train, entropy_val = entropy_rows(train_idx, val_idx, config)

    entropies = _Entropies(v[torch.from_numpy(entropy_train)], t[torch.from_numpy(entropy_train)], config, generator).to(config.device)
    index = lambda rows: tuple(x[torch.from_numpy(rows)] for x in (v, t))  # noqa: E731
    entropy_info = _train(entropies, entropies.loss, index(entropy_train), index(entropy_val), config.entropy_epochs,
                          config, generator, "entropy models", progress)
    classifiers = _Classifiers(v.shape[1], t.shape[1], len(classes), config.hidden).to(config.device)
    with_labels = lambda rows: (*index(rows), target[torch.from_numpy(rows)])  # noqa: E731
    classifier_info = _train(classifiers, classifiers.loss, with_labels(train_idx), with_labels(val_idx),
                             config.classifier_epochs, config, generator, "classifiers", progress)

    values = {name: [] for name in ("h_v", "h_t", "i_v", "i_t", "i_vt")}
    entropies.eval()
    classifiers.eval()
    with torch.no_grad():
        for start in range(0, len(v), 4096):
            bv, bt, by = v[start : start + 4096], t[start : start + 4096], target[start : start + 4096]
            values["h_v"].append(entropies.image.entropy(bv))
            values["h_t"].append(entropies.text.entropy(bt))
            prior = torch.from_numpy(log_prior).to(v)[by]
            for name, logits in zip(("i_v", "i_t", "i_vt"), classifiers.logits(bv, bt)):
                values[name].append(torch.log_softmax(logits, dim=1).gather(1, by[:, None])[:, 0] - prior)
    pointwise = {name: torch.cat(parts).double().cpu().numpy() for name, parts in values.items()}
    pointwise.update(decompose(pointwise["h_v"], pointwise["h_t"], pointwise["i_v"], pointwise["i_t"], pointwise["i_vt"]))
    info = {
        "config": asdict(config),
        "classes": [str(c) for c in classes],
        "rows": {fold: int((folds == fold).sum()) for fold in ("train", "val", "test")},
        "entropy_train_rows": int(len(entropy_train)),
        "entropy_val_rows": int(len(entropy_val)),
        "entropy": entropy_info,
        "classifiers": classifier_info,
        "seconds": time.perf_counter() - started,
    }
    result = LSMIResult(pointwise=pointwise, dominant=dominant({k: pointwise[k] for k in TERMS}), info=info)
    info["averages"] = {fold: result.averages(folds == fold) for fold in ("train", "val", "test") if (folds == fold).any()}
    return result
