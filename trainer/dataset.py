"""The XOR data set of the notes: corners of the unit square, label x1 XOR x2, plus Gaussian noise."""

from __future__ import annotations

import torch
import torch.utils.data as data


class XORDataset(data.Dataset):
    def __init__(self, size: int, std: float = 0.1, seed: int = 0):
        super().__init__()
        self.size = size
        self.std = std
        # A generator of its own, so that the same seed gives the same points whatever else ran before.
        self.generator = torch.Generator().manual_seed(seed)
        self.generate_xor_points()

    def generate_xor_points(self):
        # Each point has two coordinates, each 0 or 1; the label is their XOR:
        # 1 when exactly one of them is 1, 0 when they are equal.
        data = torch.randint(low=0, high=2, size=(self.size, 2), dtype=torch.float32, generator=self.generator)
        label = (data.sum(dim=1) == 1).to(torch.long)
        # Gaussian noise makes the problem a little harder than four points.
        data += self.std * torch.randn(data.shape, generator=self.generator)

        self.data = data
        self.label = label

    def __len__(self):
        # Number of points
        return self.size

    def __getitem__(self, idx):
        # The idx-th point and its label
        data_point = self.data[idx]
        data_label = self.label[idx]
        return data_point, data_label
