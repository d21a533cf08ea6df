"""The notes' figures as PNG files: the data set, the decision boundary over the data, the loss per epoch.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing needs a display and no
global plotting state is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

# PNG metadata would otherwise carry the matplotlib version; leave it out so the files depend only on the pixels.
PNG_METADATA = {"Software": None}
GRID_LIMITS = (-0.5, 1.5)


def _new_figure() -> Figure:
    figure = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata=PNG_METADATA)
    return path


def _scatter_classes(ax, data, label, legend_loc: str = "best") -> None:
    data_0 = data[label == 0]
    data_1 = data[label == 1]
    ax.scatter(data_0[:, 0], data_0[:, 1], edgecolor="#333", label="Class 0")
    ax.scatter(data_1[:, 0], data_1[:, 1], edgecolor="#333", label="Class 1")
    ax.set_ylabel(r"$x_2$")
    ax.set_xlabel(r"$x_1$")
    ax.legend(loc=legend_loc)


def visualize_samples(data, label, path: Path, title: str = "Dataset samples") -> Path:
    """The notes' scatter plot of the points, coloured by class."""
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy()
    if isinstance(label, torch.Tensor):
        label = label.cpu().numpy()
    figure = _new_figure()
    ax = figure.add_subplot()
    _scatter_classes(ax, data, label)
    ax.set_title(title)
    return _save(figure, path)


@torch.no_grad()
def visualize_classification(model, data, label, path: Path, title: str = "Decision boundary") -> Path:
    """The points over the model's probability of class 1, shaded from class 0's colour to class 1's."""
    model = model.cpu().eval()
    c0 = np.array(to_rgba("C0"))
    c1 = np.array(to_rgba("C1"))
    x1 = torch.arange(*GRID_LIMITS, step=0.01)
    x2 = torch.arange(*GRID_LIMITS, step=0.01)
    # "xy" indexing: rows follow x2, columns x1, as imshow draws them.
    xx1, xx2 = torch.meshgrid(x1, x2, indexing="xy")
    model_inputs = torch.stack([xx1, xx2], dim=-1)
    preds = torch.sigmoid(model(model_inputs)).numpy()  # [rows, columns, 1]
    # Clipped: float32 probabilities times float64 colours can overshoot 1 by a rounding error.
    output_image = np.clip((1 - preds) * c0 + preds * c1, 0.0, 1.0)
    figure = _new_figure()
    ax = figure.add_subplot()
    ax.imshow(output_image, origin="lower", extent=(*GRID_LIMITS, *GRID_LIMITS))
    ax.contour(xx1.numpy(), xx2.numpy(), preds[..., 0], levels=[0.5], colors="#333", linewidths=1)
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy()
    if isinstance(label, torch.Tensor):
        label = label.cpu().numpy()
    # The middle of the square is where no points are.
    _scatter_classes(ax, data, label, legend_loc="center")
    ax.set_xlim(*GRID_LIMITS)
    ax.set_ylim(*GRID_LIMITS)
    ax.grid(False)
    ax.set_title(title)
    return _save(figure, path)


def plot_loss(losses: list[float], path: Path, title: str = "Training loss") -> Path:
    """Mean BCE loss of each epoch."""
    figure = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    epochs = np.arange(1, len(losses) + 1)
    ax.plot(epochs, losses, color="C0")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean BCE loss")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    return _save(figure, path)
