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
    """A new XorClassifier holding the state_dict saved at `path` (sizes read from the weights), in eval mode."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    expected = {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    if not isinstance(state_dict, dict) or set(state_dict) != expected:
        found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"{path}: not a XorClassifier state_dict: found {found}; expected {sorted(expected)}")
    num_hidden, num_inputs = state_dict["linear1.weight"].shape
    num_outputs = state_dict["linear2.weight"].shape[0]
    model = XorClassifier(num_inputs=num_inputs, num_hidden=num_hidden, num_outputs=num_outputs)
    model.load_state_dict(state_dict)
    return model.eval()
