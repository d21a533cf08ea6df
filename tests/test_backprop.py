"""The notes' delta rule in numpy gives autograd's gradients, for squared error and for BCE."""

import numpy as np
import pytest
import torch

from trainer.backprop import backprop, loss_value
from trainer.model import XorClassifier


def random_case(seed: int):
    """Random weights (larger than at initialisation, so tanh and sigmoid saturate somewhat) and a random batch."""
    rng = np.random.default_rng(seed)
    params = {
        "linear1.weight": rng.normal(0, 2, (4, 2)),
        "linear1.bias": rng.normal(0, 1, 4),
        "linear2.weight": rng.normal(0, 2, (1, 4)),
        "linear2.bias": rng.normal(0, 1, 1),
    }
    batch = int(rng.integers(1, 65))
    x = rng.normal(0.5, 1.0, (batch, 2))
    y = rng.integers(0, 2, batch).astype(np.float64)
    return params, x, y


def autograd(params, x, y, loss: str):
    """Loss and gradients of the same network from PyTorch's autograd, in float64."""
    model = XorClassifier().double()
    model.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()})
    logits = model(torch.from_numpy(x)).squeeze(dim=1)
    target = torch.from_numpy(y)
    if loss == "bce":
        value = torch.nn.BCEWithLogitsLoss()(logits, target)
    else:
        value = (0.5 * (torch.sigmoid(logits) - target) ** 2).mean()
    value.backward()
    return value.item(), {name: param.grad.numpy() for name, param in model.named_parameters()}


@pytest.mark.parametrize("loss", ["bce", "mse"])
@pytest.mark.parametrize("seed", range(10))
def test_delta_rule_gradients_equal_autograd(loss, seed):
    params, x, y = random_case(seed)
    _, expected = autograd(params, x, y, loss)
    gradients = backprop(params, x, y, loss=loss)
    assert gradients.keys() == expected.keys()
    for name, gradient in gradients.items():
        assert gradient.shape == expected[name].shape, name
        assert np.max(np.abs(gradient - expected[name])) <= 1e-6, name


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_loss_value_equals_pytorch_loss(loss):
    params, x, y = random_case(42)
    expected, _ = autograd(params, x, y, loss)
    assert loss_value(params, x, y, loss=loss) == pytest.approx(expected, abs=1e-12)


def test_gradients_are_not_all_zero():
    # Guards the comparison above against passing on a degenerate case.
    params, x, y = random_case(3)
    for loss in ("bce", "mse"):
        assert any(np.abs(g).max() > 1e-3 for g in backprop(params, x, y, loss=loss).values())


def test_unknown_loss_is_refused():
    params, x, y = random_case(0)
    with pytest.raises(ValueError, match="loss 'hinge'"):
        backprop(params, x, y, loss="hinge")
