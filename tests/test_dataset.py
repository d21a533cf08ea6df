"""XORDataset: sizes, item types, XOR labels, noise, and seeding."""

import torch

from trainer.dataset import XORDataset


def test_dataset_has_the_requested_number_of_points():
    dataset = XORDataset(size=200, seed=0)
    assert len(dataset) == 200
    assert dataset.data.shape == (200, 2)
    assert dataset.label.shape == (200,)


def test_item_is_a_float32_point_and_a_long_label():
    data_point, data_label = XORDataset(size=10, seed=0)[3]
    assert data_point.dtype == torch.float32 and data_point.shape == (2,)
    assert data_label.dtype == torch.long and data_label.shape == ()


def test_without_noise_points_are_corners_labelled_by_xor():
    dataset = XORDataset(size=500, std=0.0, seed=1)
    assert set(dataset.data.unique().tolist()) == {0.0, 1.0}
    x1, x2 = dataset.data[:, 0].long(), dataset.data[:, 1].long()
    assert torch.equal(dataset.label, x1 ^ x2)


def test_all_four_corners_are_drawn():
    dataset = XORDataset(size=500, std=0.0, seed=2)
    assert {tuple(point) for point in dataset.data.tolist()} == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}


def test_noise_has_the_requested_std_around_the_labelled_corner():
    dataset = XORDataset(size=20_000, std=0.1, seed=3)
    corners = dataset.data.round()
    noise = dataset.data - corners
    assert abs(noise.std().item() - 0.1) < 0.005
    assert torch.equal(dataset.label, corners[:, 0].long() ^ corners[:, 1].long())


def test_same_seed_gives_the_same_points():
    first, second = XORDataset(size=100, seed=7), XORDataset(size=100, seed=7)
    assert torch.equal(first.data, second.data) and torch.equal(first.label, second.label)


def test_different_seeds_give_different_points():
    assert not torch.equal(XORDataset(size=100, seed=7).data, XORDataset(size=100, seed=8).data)


def test_points_do_not_depend_on_the_global_random_state():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        first = XORDataset(size=50, seed=4)
        torch.rand(1000)
        second = XORDataset(size=50, seed=4)
    assert torch.equal(first.data, second.data)
