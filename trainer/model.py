"""The classifier of the notes (ClasificadorSimple): Linear -> Tanh -> Linear, and loading it from a state_dict."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class XorClassifier(nn.Module):
    def __init__(self, num_inputs: int = 2, num_hidden: int = 4, num_outputs: int = 1):
        super().__init__()
        # The modules the network is built from
        self.linear1 = nn.Linear(num_inputs, num_hidden)
        self.act_fn = nn.Tanh()
        self.linear2 = nn.Linear(num_hidden, num_outputs)

    def forward(self, x):
        # The prediction: one logit per point (sigmoid(logit) is the probability of class 1)
        x = self.linear1(x)
        x = self.act_fn(x)
        x = self.linear2(x)
        return x


def architecture(model: XorClassifier) -> str:
    """The layers in one line, e.g. "Linear(2,4)-Tanh-Linear(4,1)"."""
    num_hidden, num_inputs = model.linear1.weight.shape
    num_outputs = model.linear2.weight.shape[0]
    return f"Linear({num_inputs},{num_hidden})-Tanh-Linear({num_hidden},{num_outputs})"


def load_classifier(path: str | Path) -> XorClassifier:
    """A new XorClassifier holding the state_dict saved at `path` (sizes read from the weights), in eval mode.

    Raises ValueError, with the path and the reason in one line, when the file cannot be read or is not
    such a state_dict."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load reports a damaged file as any of several types (zip, pickle, key errors)
        # The first sentence: torch.load's messages go on with advice that does not fit a damaged file.
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else "no details"
        raise ValueError(f"{path}: not a readable state_dict ({type(exc).__name__}: {reason})") from exc
    expected = {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    if not isinstance(state_dict, dict) or set(state_dict) != expected:
        found = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"{path}: not a XorClassifier state_dict: found {found}; expected {sorted(expected)}")
    shapes = {name: tuple(v.shape) if isinstance(v, torch.Tensor) else None for name, v in state_dict.items()}
    if any(shape is None or len(shape) != (2 if name.endswith("weight") else 1) for name, shape in shapes.items()):
        raise ValueError(f"{path}: not a XorClassifier state_dict: tensor shapes {shapes}")
    num_hidden, num_inputs = shapes["linear1.weight"]
    num_outputs = shapes["linear2.weight"][0]
    model = XorClassifier(num_inputs=num_inputs, num_hidden=num_hidden, num_outputs=num_outputs)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:  # the sizes do not fit together
        raise ValueError(f"{path}: not a XorClassifier state_dict: tensor shapes {shapes}") from exc
    return model.eval()
