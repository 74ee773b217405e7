"""KNIFE marginal entropy model (Pichler et al. 2022): a Gaussian mixture with K components whose
covariances are parameterised by per-component scales in [1/e, e] and a unit-lower-triangular mixing
matrix, trained on negative log-likelihood. h(x) = -log p(x).

Because the scales are bounded, features must be standardised first; otherwise low-variance features
(PCA tails) pin every entropy to the same floor.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class KNIFE(nn.Module):
    """p(x) = sum_k w_k N(y_k; 0, I) |det J_k| with y_k = (I + L_k) diag(s_k) (x - mu_k), L_k strictly lower
    triangular, s_k = exp(tanh(a_k)); det J_k = prod s_k.

    Parameters
    ----------
    init_means
        (K, d) starting means, e.g. K random training rows.
    """

    def __init__(self, init_means: torch.Tensor, init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        components, dim = init_means.shape
        self.dim = dim
        self.means = nn.Parameter(init_means.clone().float())
        self.log_scale = nn.Parameter(init_std * torch.randn(components, dim, generator=generator))
        self.mixing = nn.Parameter(init_std * torch.randn(components, dim, dim, generator=generator))
        self.weight_logits = nn.Parameter(torch.zeros(components))
        self.register_buffer("mask", torch.tril(torch.ones(dim, dim), diagonal=-1))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for a (B, d) batch."""
        scale = torch.exp(torch.tanh(self.log_scale))  # (K, d)
        y = (x[:, None, :] - self.means) * scale  # (B, K, d)
        lower = self.mixing * self.mask  # (K, d, d)
        y = y + torch.einsum("kij,bkj->bki", lower, y)
        log_det = torch.tanh(self.log_scale).sum(-1)  # log prod s_k
        log_weight = torch.log_softmax(self.weight_logits, dim=0)
        per_component = -0.5 * (y * y).sum(-1) + log_det + log_weight
        return torch.logsumexp(per_component, dim=-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """Pointwise h(x) = -log p(x)."""
        return -self.log_prob(x)
