"""Routing by a linear probe on the base model's hidden states.

A multinomial logistic regression (softmax regression; a "linear probe" in the sense of
Alain & Bengio 2016, "Understanding intermediate layers using linear classifier probes")
over the mean final hidden state of a text (:func:`.routing.embed`), fit on samples of
each adapter's domain (its train split). Features are standardised with the fit samples'
mean and standard deviation; the objective is the mean cross-entropy plus
``l2 / 2 * ||W||^2`` (bias not penalised), minimised by full-batch Adam (cosine lr) in float64
(N x d parameters: small). Unlike a centroid it learns which hidden directions separate
the domains, not only where each one's mean is. A text scores ``-log softmax(W z + b)``
per adapter (lower = better), at the cost of one base forward pass, like the signature
router.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AdapterError

__all__ = ["DEFAULT_L2", "Probe", "fit_probe", "log_softmax", "objective_and_grad"]

DEFAULT_L2 = 1e-3


@dataclass
class Probe:
    mean: np.ndarray  # (d,)
    std: np.ndarray  # (d,)
    weight: np.ndarray  # (N, d)
    bias: np.ndarray  # (N,)

    def scores(self, emb: np.ndarray) -> np.ndarray:
        """(T, N) ``-log p(adapter | text)`` of (T, d) embeddings."""
        z = (emb.astype(np.float64) - self.mean) / self.std
        return -log_softmax(z @ self.weight.T + self.bias)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log softmax of (T, N) logits (max-shifted)."""
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def objective_and_grad(w: np.ndarray, b: np.ndarray, z: np.ndarray, y: np.ndarray,
                       l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean softmax cross-entropy of (T, d) features ``z`` with labels ``y`` plus
    ``l2/2 ||w||^2``, and its gradients with respect to ``w`` (N, d) and ``b`` (N,)."""
    logp = log_softmax(z @ w.T + b)
    t = len(y)
    loss = -logp[np.arange(t), y].mean() + 0.5 * l2 * float((w * w).sum())
    p = np.exp(logp)
    p[np.arange(t), y] -= 1.0
    return loss, p.T @ z / t + l2 * w, p.mean(0)


def fit_probe(embs: list[np.ndarray], l2: float = DEFAULT_L2, steps: int = 500, lr: float = 0.05) -> Probe:
    """Fit on per-adapter (T_n, d) embeddings, in bank order (Adam, full batch, cosine lr).

    Raises:
        AdapterError: an adapter has no samples.
    """
    if any(len(e) == 0 for e in embs):
        raise AdapterError("fit_probe: every adapter needs at least one sample")
    x = np.concatenate(embs).astype(np.float64)
    y = np.concatenate([np.full(len(e), i) for i, e in enumerate(embs)])
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    n, d = len(embs), x.shape[1]
    w, b = np.zeros((n, d)), np.zeros(n)
    state = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    for step in range(1, steps + 1):
        _, gw, gb = objective_and_grad(w, b, z, y, l2)
        lr_t = lr * 0.5 * (1.0 + np.cos(np.pi * (step - 1) / steps))  # cosine to 0: settles at the optimum
        for i, (p, g) in enumerate(((w, gw), (b, gb))):
            m, v = state[2 * i], state[2 * i + 1]
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= lr_t * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    return Probe(mean, std, w, b)
