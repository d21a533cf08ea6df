"""XorClassifier: the notes' parameter shapes, its output, and saving/reloading its state_dict."""

import pytest
import torch

from trainer.model import XorClassifier, load_classifier


def seeded_classifier(seed: int) -> XorClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return XorClassifier(num_inputs=2, num_hidden=4, num_outputs=1)


def test_named_parameters_have_the_notes_shapes():
    model = XorClassifier(num_inputs=2, num_hidden=4, num_outputs=1)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
    assert shapes == {
        "linear1.weight": (4, 2),
        "linear1.bias": (4,),
        "linear2.weight": (1, 4),
        "linear2.bias": (1,),
    }


def test_layers_are_linear_tanh_linear():
    model = XorClassifier()
    assert [type(module) for module in model.children()] == [torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]


def test_forward_gives_one_logit_per_point():
    assert XorClassifier()(torch.rand(7, 2)).shape == (7, 1)


def test_reloaded_state_dict_gives_identical_outputs(tmp_path):
    model = seeded_classifier(0)
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")

    state_dict = torch.load(tmp_path / "state_dict.pt", weights_only=True)
    new_model = XorClassifier(num_inputs=2, num_hidden=4, num_outputs=1)
    new_model.load_state_dict(state_dict)

    x = torch.rand(100, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), new_model(x))


def test_load_classifier_gives_the_saved_model_in_eval_mode(tmp_path):
    model = seeded_classifier(1)
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    loaded = load_classifier(tmp_path / "state_dict.pt")
    x = torch.rand(100, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def test_load_classifier_rejects_another_state_dict(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a XorClassifier state_dict"):
        load_classifier(tmp_path / "other.pt")


def test_load_classifier_reports_a_damaged_file_as_value_error_naming_it(tmp_path):
    torch.save(seeded_classifier(2).state_dict(), tmp_path / "full.pt")
    (tmp_path / "state_dict.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="state_dict.pt: not a readable state_dict"):
        load_classifier(tmp_path / "state_dict.pt")


def test_load_classifier_rejects_tensors_of_the_wrong_shapes(tmp_path):
    state_dict = seeded_classifier(3).state_dict()
    state_dict["linear1.bias"] = torch.zeros(3)
    torch.save(state_dict, tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="tensor shapes"):
        load_classifier(tmp_path / "state_dict.pt")
