"""Training as in the notes: the accuracy bar, determinism, evaluation, and the `xorserve train` folder."""

import json

import pytest
import torch
import torch.utils.data as data

from serving.cli.main import command_parser, main
from serving.devices import DeviceUnavailableError
from trainer.train import TrainSettings, eval_model, pick_device, train


@pytest.fixture(scope="module")
def trained():
    """Full 100-epoch training runs with the notes' settings, one per seed, each run once per module
    (about 1.5 s each on an idle 2-core machine, hence the tests using them are marked slow)."""
    runs = {}

    def get(seed: int):
        if seed not in runs:
            runs[seed] = train(TrainSettings(seed=seed), device="cpu", progress=False)
        return runs[seed]

    return get


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`xorserve train` with every default: the folder shipped as models/xor/1 is made this way."""
    out = tmp_path_factory.mktemp("repo") / "xor" / "1"
    rc = main(["train", "--out", str(out), "--device", "cpu"])
    return rc, out


def test_default_settings_are_the_notes():
    assert TrainSettings() == TrainSettings(
        seed=0, epochs=100, lr=0.1, batch_size=128, train_size=2500, test_size=500, std=0.1
    )


@pytest.mark.slow
def test_default_seed_classifies_every_test_point(trained):
    assert trained(TrainSettings().seed).test_accuracy == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_seeds_0_to_4_reach_99_percent_test_accuracy(trained, seed):
    assert trained(seed).test_accuracy >= 0.99


@pytest.mark.slow
def test_loss_is_recorded_per_epoch_and_falls(trained):
    losses = trained(0).losses
    assert len(losses) == 100
    assert losses[-1] < 0.1 < 0.5 < losses[0]


def test_same_seed_trains_identical_weights():
    settings = TrainSettings(seed=3, epochs=5)
    first = train(settings, device="cpu", progress=False)
    second = train(settings, device="cpu", progress=False)
    assert first.losses == second.losses
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_different_seeds_train_different_weights():
    first = train(TrainSettings(seed=3, epochs=1), device="cpu", progress=False)
    second = train(TrainSettings(seed=4, epochs=1), device="cpu", progress=False)
    assert not torch.equal(first.model.linear1.weight, second.model.linear1.weight)


@pytest.mark.slow
def test_test_set_is_not_the_training_set(trained):
    result = trained(0)
    assert not torch.equal(result.train_dataset.data[:500], result.test_dataset.data)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are the first input column."""

    def forward(self, x):
        return x[:, :1]


def test_eval_model_is_the_fraction_with_sigmoid_at_least_one_half():
    # Logit 0 is probability 0.5: class 1, as in the notes' `preds >= 0.5`.
    inputs = torch.tensor([[-2.0, 0.0], [0.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])
    loader = data.DataLoader(data.TensorDataset(inputs, labels), batch_size=2)
    assert eval_model(FixedLogits(), loader) == pytest.approx(3 / 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_fails_clearly():
    with pytest.raises(DeviceUnavailableError, match="--device cuda"):
        pick_device("cuda")


@pytest.mark.slow
def test_train_command_exits_zero_and_writes_the_model_folder(default_run):
    rc, out = default_run
    assert rc == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        "model.onnx",
        "plots/dataset.png",
        "plots/decision_boundary.png",
        "plots/loss.png",
        "report.json",
        "state_dict.pt",
    ]


@pytest.mark.slow
def test_report_holds_accuracy_settings_losses_parity_and_hashes(default_run):
    import hashlib

    _, out = default_run
    report = json.loads((out / "report.json").read_text())
    assert report["test_accuracy"] == 1.0
    assert report["settings"] == TrainSettings().as_dict()
    assert len(report["loss_per_epoch"]) == 100
    assert report["parity"]["passed"] is True
    for name in ("model.onnx", "state_dict.pt"):
        assert report["artifacts"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()


@pytest.mark.slow
def test_report_names_no_path_of_the_machine(default_run):
    _, out = default_run
    assert str(out.parent.parent) not in (out / "report.json").read_text()


@pytest.mark.slow
def test_same_seed_gives_byte_identical_model_files(tmp_path):
    for run in ("first", "second"):
        rc = main(["train", "--out", str(tmp_path / run), "--epochs", "10", "--device", "cpu", "--no-plots"])
        assert rc == 0
    for name in ("state_dict.pt", "model.onnx", "report.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_settings_refuse_values_that_train_nothing():
    with pytest.raises(ValueError, match="epochs=0 must be positive"):
        TrainSettings(epochs=0)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--batch-size", "0"),
        ("--train-size", "0"),
        ("--test-size", "0"),
        ("--epochs", "0"),
        ("--epochs", "-1"),
        ("--std", "-1"),
        ("--seed", "-1"),
    ],
)
def test_train_refuses_a_bad_value_with_a_usage_error_naming_the_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "xor" / "1"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(out), "--device", "cpu", flag, value])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert f"argument {flag}:" in line
    assert not out.parent.exists()


def test_train_checks_a_value_from_the_environment_like_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XORSERVE_EPOCHS", "0")
    assert main(["train", "--out", str(tmp_path / "1"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "xorserve train: error: XORSERVE_EPOCHS='0': must be at least 1, not 0\n"


def test_train_out_comes_from_xorserve_train_out_not_xorserve_out(tmp_path, monkeypatch):
    monkeypatch.setenv("XORSERVE_OUT", str(tmp_path / "export.onnx"))
    monkeypatch.setenv("XORSERVE_TRAIN_OUT", str(tmp_path / "xor" / "1"))
    parser, _ = command_parser("train")
    assert parser.parse_args([]).out == tmp_path / "xor" / "1"


def test_model_version_asked_of_a_server_does_not_change_what_train_records(monkeypatch):
    # XORSERVE_MODEL_VERSION is the version `predict` and `score` ask for.
    monkeypatch.setenv("XORSERVE_MODEL_VERSION", "7")
    monkeypatch.setenv("XORSERVE_MODEL_NAME", "other")
    parser, _ = command_parser("train")
    args = parser.parse_args(["--out", "models/xor/1"])
    assert (args.model_name, args.model_version) == (None, None)
    monkeypatch.setenv("XORSERVE_TRAIN_MODEL_VERSION", "7")
    assert command_parser("train")[0].parse_args(["--out", "models/xor/1"]).model_version == "7"


@pytest.fixture
def previous_folder(tmp_path):
    """A version folder from an earlier run: what a failed or interrupted run must leave as it was."""
    out = tmp_path / "repo" / "xor" / "1"
    (out / "plots").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"previous model")
    (out / "plots" / "old.png").write_bytes(b"previous plot")
    return out


def folder_contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_that_fails_leaves_the_previous_folder_and_no_temporary_folder(previous_folder, monkeypatch):
    before = folder_contents(previous_folder)

    def failing_export(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr("trainer.pipeline.export_state_dict", failing_export)
    with pytest.raises(RuntimeError, match="export failed"):
        main(["train", "--out", str(previous_folder), "--epochs", "1", "--device", "cpu", "--no-plots"])
    assert folder_contents(previous_folder) == before
    assert [p.name for p in previous_folder.parent.iterdir()] == ["1"]


def test_an_interrupted_run_exits_130_and_leaves_the_previous_folder(previous_folder, monkeypatch, capsys):
    before = folder_contents(previous_folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("trainer.pipeline.train", interrupted)
    assert main(["train", "--out", str(previous_folder), "--device", "cpu"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert folder_contents(previous_folder) == before
    assert [p.name for p in previous_folder.parent.iterdir()] == ["1"]


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "1").write_text("not a folder")
    assert main(["train", "--out", str(tmp_path / "1"), "--device", "cpu"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "1").read_text() == "not a folder"


@pytest.mark.slow
def test_a_finished_run_replaces_the_folder_whole(previous_folder):
    assert main(["train", "--out", str(previous_folder), "--epochs", "1", "--device", "cpu", "--no-plots"]) == 0
    assert sorted(folder_contents(previous_folder)) == ["model.onnx", "report.json", "state_dict.pt"]
    assert [p.name for p in previous_folder.parent.iterdir()] == ["1"]


@pytest.mark.slow
def test_a_parity_miss_still_writes_the_folder_records_the_miss_and_exits_1(previous_folder, monkeypatch):
    from trainer import parity

    def missed(folder, device):
        return {**parity.run_parity(folder, device=device), "passed": False}

    monkeypatch.setattr("trainer.pipeline.run_parity", missed)
    assert main(["train", "--out", str(previous_folder), "--epochs", "1", "--device", "cpu", "--no-plots"]) == 1
    assert json.loads((previous_folder / "report.json").read_text())["parity"]["passed"] is False
    assert "plots/old.png" not in folder_contents(previous_folder)
