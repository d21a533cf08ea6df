"""Training and evaluation as in the notes: train_model (five steps per batch) and eval_model (accuracy)."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.utils.data as data
from tqdm import tqdm

from serving.devices import DEVICES, DeviceUnavailableError
from trainer import numerics
from trainer.dataset import XORDataset
from trainer.model import XorClassifier

log = logging.getLogger(__name__)

# The test set is drawn with seed + TEST_SEED_OFFSET, so it never coincides with the training set
# of another seed below 2**32.
TEST_SEED_OFFSET = 2**32
# torch's generators take seeds below 2**64, and the test set's seed is seed + TEST_SEED_OFFSET.
MAX_SEED = 2**64 - 1 - TEST_SEED_OFFSET


@dataclass(frozen=True)
class TrainSettings:
    """The notes' settings are the defaults: 2,500 points, std 0.1, batch 128, SGD lr 0.1, 100 epochs."""

    seed: int = 0
    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 128
    train_size: int = 2500
    test_size: int = 500
    std: float = 0.1

    def __post_init__(self) -> None:
        # Zero epochs or points, or a negative rate or noise, would train nothing and report nonsense.
        problems = [
            f"{name}={getattr(self, name)!r} must be positive"
            for name in ("epochs", "lr", "batch_size", "train_size", "test_size")
            if not getattr(self, name) > 0
        ]
        if not self.std >= 0:
            problems.append(f"std={self.std!r} must be zero or positive")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed={self.seed!r} must be from 0 to {MAX_SEED}")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: XorClassifier
    losses: list[float]  # mean training loss per epoch
    test_accuracy: float  # fraction of the test set classified correctly
    device: str
    train_dataset: XORDataset
    test_dataset: XORDataset
    numerics: dict  # the kernels and settings in effect (trainer.numerics)


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when PyTorch sees a GPU, else CPU; `cuda` fails when there is none."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("--device cuda: PyTorch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train_model(model, optimizer, data_loader, loss_module, num_epochs=100, device="cpu", progress=True):
    """The notes' training loop; returns the mean loss of each epoch."""
    # Set model to train mode
    model.train()
    losses = []
    epochs = epoch_progress(num_epochs, enabled=progress)
    for _epoch in epochs:
        epoch_loss = 0.0
        for data_inputs, data_labels in data_loader:
            ## Step 1: move the batch to the device the model is on
            data_inputs = data_inputs.to(device)
            data_labels = data_labels.to(device)

            ## Step 2: run the model on the batch
            preds = model(data_inputs)
            preds = preds.squeeze(dim=1)  # [batch, 1] -> [batch]

            ## Step 3: compute the loss
            loss = loss_module(preds, data_labels.float())

            ## Step 4: backpropagation
            # Gradients accumulate, so set them to zero before computing new ones
            optimizer.zero_grad()
            loss.backward()

            ## Step 5: update the parameters
            optimizer.step()

            epoch_loss += loss.item() * data_labels.shape[0]
        losses.append(epoch_loss / len(data_loader.dataset))
        epochs.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


class PlainProgress:
    """Progress as a few plain lines, for a log or a pipe, where a bar's frames would pile up on one line."""

    LINES = 10

    def __init__(self, total: int, stream):
        self.total, self.stream, self.epoch = total, stream, 0
        self.every = max(1, -(-total // self.LINES))  # ceil: at most LINES lines, the last epoch always

    def __iter__(self):
        for epoch in range(self.total):
            self.epoch = epoch + 1
            yield epoch

    def set_postfix(self, loss: str) -> None:
        if self.epoch % self.every == 0 or self.epoch == self.total:
            print(f"train: epoch {self.epoch}/{self.total} loss={loss}", file=self.stream, flush=True)


def epoch_progress(num_epochs: int, enabled: bool = True, stream=None):
    """The epochs to loop over, shown as a bar on a terminal and as plain lines otherwise (or not at all)."""
    stream = sys.stderr if stream is None else stream
    if enabled and not stream.isatty():
        return PlainProgress(num_epochs, stream)
    return tqdm(range(num_epochs), desc="train", unit="epoch", disable=not enabled, file=stream)


def eval_model(model, data_loader, device="cpu"):
    """Accuracy (a fraction) of the model on the data: a point is class 1 when sigmoid(logit) >= 0.5."""
    model.eval()  # Set model to eval mode
    true_preds, num_preds = 0, 0
    with torch.no_grad():  # No gradients needed to evaluate
        for data_inputs, data_labels in data_loader:
            data_inputs, data_labels = data_inputs.to(device), data_labels.to(device)
            preds = model(data_inputs)
            preds = preds.squeeze(dim=1)
            preds = torch.sigmoid(preds)
            pred_labels = (preds >= 0.5).long()  # Binarise the predictions
            true_preds += (pred_labels == data_labels).sum().item()
            num_preds += data_labels.shape[0]
    return true_preds / num_preds


def train(
    settings: TrainSettings, device: str = "auto", progress: bool = True, numerics_mode: str = "pinned"
) -> TrainResult:
    """Data sets, model, loss and optimiser as in the notes, trained and evaluated; deterministic for a seed.

    With `numerics_mode` "pinned" (trainer.numerics) the weights are the same bytes on every x86-64 CPU."""
    with numerics.apply(numerics_mode) as in_effect:
        return _train(settings, pick_device(device), progress, in_effect)


def _train(settings: TrainSettings, torch_device: torch.device, progress: bool, in_effect: dict) -> TrainResult:
    train_dataset = XORDataset(size=settings.train_size, std=settings.std, seed=settings.seed)
    test_dataset = XORDataset(size=settings.test_size, std=settings.std, seed=settings.seed + TEST_SEED_OFFSET)
    # The shuffling order comes from its own generator, seeded like the rest.
    shuffle_generator = torch.Generator().manual_seed(settings.seed)
    train_data_loader = data.DataLoader(
        train_dataset, batch_size=settings.batch_size, shuffle=True, generator=shuffle_generator
    )
    test_data_loader = data.DataLoader(test_dataset, batch_size=settings.batch_size, shuffle=False)

    # The initial weights come from the global generator; fork it so the seed does not leak out.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = XorClassifier(num_inputs=2, num_hidden=4, num_outputs=1)
    model.to(torch_device)

    loss_module = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    log.info(
        "event=train_start device=%s numerics=%s cpu_capability=%s %s",
        torch_device,
        in_effect["mode"],
        in_effect["cpu_capability"],
        " ".join(f"{k}={v}" for k, v in settings.as_dict().items()),
    )
    losses = train_model(
        model, optimizer, train_data_loader, loss_module, settings.epochs, device=torch_device, progress=progress
    )
    test_accuracy = eval_model(model, test_data_loader, device=torch_device)
    log.info(
        "event=train_done final_loss=%.6f test_accuracy=%.4f", losses[-1] if losses else float("nan"), test_accuracy
    )
    return TrainResult(
        model=model.cpu().eval(),
        losses=losses,
        test_accuracy=test_accuracy,
        device=torch_device.type,
        train_dataset=train_dataset,
        test_dataset=test_dataset,
        numerics=in_effect,
    )
