"""Backpropagation by hand, in numpy: the notes' delta rule for the Linear -> Tanh -> Linear network.

Layers are numbered like the notes: layer 1 is the hidden layer (z1 = W1 x + b1, a1 = tanh(z1)), layer 2
(= L) the output (z2 = W2 a1 + b2). The rule, for one point:

    delta^L     = dL/da^L * a'(z^L)                     error of the last layer
    delta^(l-1) = (W^l)^T delta^l * a'(z^(l-1))         propagated back one layer
    dL/dW^l     = delta^l (a^(l-1))^T,  dL/db^l = delta^l

Points are the rows of `x`, so a column vector of the notes is a row here and (W^l)^T delta^l is
`delta @ W`. Both losses are averaged over the batch, as PyTorch's are by default:
- "mse": the notes' squared error on a sigmoid output, L = 1/2 (a^L - y)^2 with a^L = sigmoid(z^L);
- "bce": binary cross-entropy on a^L = sigmoid(z^L), what BCEWithLogitsLoss computes from z^L.
"""

from __future__ import annotations

import numpy as np

LOSSES = ("bce", "mse")


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def forward(params: dict[str, np.ndarray], x: np.ndarray):
    """Weighted sums and activations of both layers; params are named like the model's state_dict."""
    z1 = x @ params["linear1.weight"].T + params["linear1.bias"]
    a1 = np.tanh(z1)
    z2 = a1 @ params["linear2.weight"].T + params["linear2.bias"]
    return z1, a1, z2


def loss_value(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, loss: str = "bce") -> float:
    """The loss of the batch (mean over the points); y holds 0/1 labels, shape [N]."""
    _, _, z2 = forward(params, x)
    z = z2[:, 0]
    if loss == "mse":
        return float(np.mean(0.5 * (sigmoid(z) - y) ** 2))
    if loss == "bce":
        # -[y log a + (1 - y) log(1 - a)] written stably in terms of z: max(z, 0) - z y + log(1 + e^-|z|)
        return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
    raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")


def backprop(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, loss: str = "bce") -> dict[str, np.ndarray]:
    """dL/dparam for every parameter, by the delta rule; keys and shapes as in the state_dict."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    n = x.shape[0]
    y = y.reshape(n, 1)
    _, a1, z2 = forward(params, x)
    a2 = sigmoid(z2)

    # 1. Error of the last layer, delta^L = dL/da^L * a'(z^L), where a = sigmoid(z) and a'(z) = a (1 - a).
    #    Squared error: dL/da = a - y. Cross-entropy: dL/da = (a - y) / (a (1 - a)), so a'(z) cancels.
    delta2 = (a2 - y) * a2 * (1 - a2) if loss == "mse" else a2 - y
    delta2 = delta2 / n  # the loss is the mean over the batch

    # 2. Propagate it back to the hidden layer: delta^1 = (W^2)^T delta^2 * tanh'(z^1), tanh' = 1 - tanh^2.
    delta1 = (delta2 @ params["linear2.weight"]) * (1 - a1**2)

    # 3. Gradients of each layer from its error and the activations that enter it (summed over the points).
    return {
        "linear1.weight": delta1.T @ x,
        "linear1.bias": delta1.sum(axis=0),
        "linear2.weight": delta2.T @ a1,
        "linear2.bias": delta2.sum(axis=0),
    }
