"""Pointwise partial information decomposition with specificity and ambiguity (Finn & Lizier 2018; the
Self-Captioning MI Tuning paper, Def. 3.1-3.3 and App. A).

For each source m: i+(x_m; y) = h(x_m) (specificity), i-(x_m; y) = h(x_m | y) (ambiguity), and
i(x_m; y) = i+ - i-. Redundancy takes the smaller specificity and the smaller ambiguity:
r+ = min(i+_V, i+_T), r- = min(i-_V, i-_T), r = r+ - r-; then u_V = i_V - r, u_T = i_T - r,
s = i_VT - r - u_V - u_T.

``decompose`` is the one implementation of this arithmetic: the exact decomposition of a discrete joint
distribution below and the LSMI estimator both call it. It works on numpy arrays and torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TERMS = ("r", "u_v", "u_t", "s")


def _minimum(a, b):
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.minimum(a, b)
    import torch

    return torch.minimum(a, b)


def decompose(h_v, h_t, i_v, i_t, i_vt) -> dict:
    """Pointwise r, u_v, u_t, s from specificities h(x_m) and pointwise informations i(x_m; y).

    The ambiguities follow as i-_m = h(x_m) - i(x_m; y).
    """
    r_plus = _minimum(h_v, h_t)
    r_minus = _minimum(h_v - i_v, h_t - i_t)
    r = r_plus - r_minus
    u_v = i_v - r
    u_t = i_t - r
    s = i_vt - r - u_v - u_t
    return {"r": r, "u_v": u_v, "u_t": u_t, "s": s}


def dominant(terms: dict) -> np.ndarray:
    """Name of the largest of r, u_v, u_t, s per sample (first in that order on a tie)."""
    stacked = np.stack([np.asarray(terms[name]) for name in TERMS])
    return np.array(TERMS)[np.argmax(stacked, axis=0)]


@dataclass
class ExactPID:
    """The decomposition of a discrete p(x1, x2, y): pointwise terms for every event with p > 0 (arrays
    aligned with ``events``) and their expectations (``averages``)."""

    events: np.ndarray  # (n, 3) indices (x1, x2, y)
    probability: np.ndarray
    pointwise: dict
    averages: dict


def exact_pid(joint: np.ndarray, base: float = 2.0) -> ExactPID:
    """Exact pointwise PID of a joint distribution ``joint[x1, x2, y]`` (x1 = image, x2 = text).

    Parameters
    ----------
    base
        Logarithm base of the result: 2 for bits, e for nats.
    """
    joint = np.asarray(joint, dtype=float)
    if joint.ndim != 3 or np.any(joint < 0) or not math.isclose(joint.sum(), 1.0, rel_tol=1e-9):
        raise ValueError("joint must be a 3-d array of probabilities p[x1, x2, y] summing to 1")
    log = np.log(joint, where=joint > 0, out=np.full_like(joint, -np.inf)) / math.log(base)
    p1, p2, py = joint.sum((1, 2)), joint.sum((0, 2)), joint.sum((0, 1))
    p1y, p2y, p12 = joint.sum(1), joint.sum(0), joint.sum(2)
    events = np.argwhere(joint > 0)
    a, b, y = events.T
    lg = lambda p: np.log(p) / math.log(base)  # noqa: E731
    h_v, h_t = -lg(p1[a]), -lg(p2[b])
    i_v = lg(p1y[a, y] / p1[a]) - lg(py[y])
    i_t = lg(p2y[b, y] / p2[b]) - lg(py[y])
    i_vt = log[a, b, y] - lg(p12[a, b]) - lg(py[y])
    pointwise = {"h_v": h_v, "h_t": h_t, "i_v": i_v, "i_t": i_t, "i_vt": i_vt, **decompose(h_v, h_t, i_v, i_t, i_vt)}
    weights = joint[a, b, y]
    averages = {name: float(np.sum(weights * values)) for name, values in pointwise.items()}
    return ExactPID(events=events, probability=weights, pointwise=pointwise, averages=averages)


def classic_distributions() -> dict[str, np.ndarray]:
    """The textbook two-bit examples, as p[x1, x2, y] with uniform inputs."""
    dists = {}
    for name, rule in {
        "xor": lambda a, b: a ^ b,
        "and": lambda a, b: a & b,
        "unique_x1": lambda a, b: a,
    }.items():
        joint = np.zeros((2, 2, 2))
        for a in (0, 1):
            for b in (0, 1):
                joint[a, b, rule(a, b)] = 0.25
        dists[name] = joint
    copy = np.zeros((2, 2, 2))
    copy[0, 0, 0] = copy[1, 1, 1] = 0.5  # x1 = x2 = y
    dists["redundant_copy"] = copy
    return dists
