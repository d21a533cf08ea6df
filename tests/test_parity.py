"""Parity: PyTorch vs ONNX Runtime on the same points; a pass, failures, contract checks, the served path."""

import json
import shutil
import sys
import types

import numpy as np
import onnx
import pytest
import torch

from serving.cli.main import command_parser, main
from serving.runtime import SessionSettings, open_session
from trainer.export import export_state_dict
from trainer.model import XorClassifier
from trainer.parity import compare, parity_points, run_parity


def make_model_folder(folder, seed: int):
    """A model folder (state_dict.pt + model.onnx) for a classifier with seeded random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XorClassifier()
    torch.save(model.state_dict(), folder / "state_dict.pt")
    export_state_dict(folder / "state_dict.pt", folder / "model.onnx")
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("models") / "xor" / "1", seed=11)


@pytest.fixture(scope="module")
def other_weights_onnx(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("other"), seed=12) / "model.onnx"


def test_points_are_the_grid_the_random_points_and_the_corners():
    points = parity_points()
    assert points.shape == (1_100_004, 2) and points.dtype == np.float32
    grid = points[:1_000_000]
    assert grid.min() == -0.5 and grid.max() == 1.5 and len(np.unique(grid[:, 0])) == 1000
    assert points[-4:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert np.array_equal(parity_points(), points)


def test_exported_model_passes_on_cpu(model_folder):
    result = run_parity(model_folder, device="cpu")
    assert result["passed"] is True
    (cpu,) = result["paths"]
    assert cpu["provider"] == "CPUExecutionProvider"
    for output in cpu["outputs"].values():
        assert output["max_abs_error"] <= 1e-5
        assert output["label_agreement"] == 1.0


def test_parity_command_prints_a_table_writes_json_and_exits_zero(model_folder, tmp_path, capsys):
    assert main(["parity", str(model_folder), "--device", "cpu", "--json", str(tmp_path / "parity.json")]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime-cpu" in printed and "probability" in printed and "PASS" in printed
    written = json.loads((tmp_path / "parity.json").read_text())
    assert written["passed"] is True
    assert set(written["paths"][0]["outputs"]) == {"logits", "probability"}
    # In this process torch ran operators before: the numerics are applied, but the kernels stay as chosen.
    assert written["reference_numerics"]["mode"] == "pinned"
    assert written["reference_numerics"]["threads"] == 1


def test_model_with_other_weights_fails(model_folder, other_weights_onnx, tmp_path, capsys):
    folder = tmp_path / "mismatched"
    folder.mkdir()
    shutil.copy(model_folder / "state_dict.pt", folder / "state_dict.pt")
    shutil.copy(other_weights_onnx, folder / "model.onnx")
    assert main(["parity", str(folder), "--device", "cpu", "--json", str(tmp_path / "parity.json")]) == 1
    assert "FAIL" in capsys.readouterr().out
    outputs = json.loads((tmp_path / "parity.json").read_text())["paths"][0]["outputs"]
    assert outputs["probability"]["max_abs_error"] > 1e-5
    assert outputs["probability"]["labels_differing"] > 0


def boundary_model_folder(folder, onnx_bias: float):
    """state_dict.pt with logit = tanh(x1) - tanh(x2), exactly 0 on the grid's diagonal (x1 == x2) in any
    summation order; model.onnx exported from the same weights with the output bias set to `onnx_bias`."""
    folder.mkdir(parents=True, exist_ok=True)
    model = XorClassifier()
    with torch.no_grad():
        model.linear1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        model.linear1.bias.zero_()
        model.linear2.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0]]))
        model.linear2.bias.zero_()
    torch.save(model.state_dict(), folder / "state_dict.pt")
    with torch.no_grad():
        model.linear2.bias.fill_(onnx_bias)
    torch.save(model.state_dict(), folder / "shifted.pt")
    export_state_dict(folder / "shifted.pt", folder / "model.onnx")
    (folder / "shifted.pt").unlink()
    return folder


def test_model_with_grid_points_exactly_on_its_boundary_passes_and_reports_them(tmp_path, capsys):
    # ONNX Runtime's logits are 1e-7 below PyTorch's: within tolerance, and every diagonal point changes side.
    folder = boundary_model_folder(tmp_path / "boundary", onnx_bias=-1e-7)
    assert main(["parity", str(folder), "--device", "cpu", "--json", str(tmp_path / "parity.json")]) == 0
    assert "on boundary" in capsys.readouterr().out
    logits = json.loads((tmp_path / "parity.json").read_text())["paths"][0]["outputs"]["logits"]
    assert logits["on_boundary"] >= 1000  # the diagonal of the 1,000 x 1,000 grid
    assert logits["labels_differing_on_boundary"] >= 1000
    assert logits["labels_differing"] == 0


def test_model_whose_labels_move_off_the_boundary_fails(tmp_path):
    folder = boundary_model_folder(tmp_path / "moved", onnx_bias=-1e-3)
    result = run_parity(folder, device="cpu")
    assert result["passed"] is False
    logits = result["paths"][0]["outputs"]["logits"]
    assert logits["labels_differing"] > 0  # points whose reference lies in (1e-5, 1e-3): off the boundary


def test_model_with_a_renamed_output_is_refused_with_the_reason(model_folder, tmp_path, capsys):
    folder = tmp_path / "renamed"
    folder.mkdir()
    shutil.copy(model_folder / "state_dict.pt", folder / "state_dict.pt")
    model = onnx.load(model_folder / "model.onnx")
    model.graph.output[1].name = "prob"
    for node in model.graph.node:
        node.output[:] = ["prob" if name == "probability" else name for name in node.output]
    onnx.save(model, folder / "model.onnx")
    assert main(["parity", str(folder), "--device", "cpu"]) == 2
    message = capsys.readouterr().err
    assert "does not match the contract" in message and "'prob'" in message and "'probability'" in message


def test_model_with_a_fixed_batch_size_is_refused(model_folder, tmp_path, capsys):
    folder = tmp_path / "fixed"
    folder.mkdir()
    shutil.copy(model_folder / "state_dict.pt", folder / "state_dict.pt")
    model = onnx.load(model_folder / "model.onnx")
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 8
    onnx.save(model, folder / "model.onnx")
    assert main(["parity", str(folder), "--device", "cpu"]) == 2
    assert "expected [-1, 2] (dynamic batch)" in capsys.readouterr().err


def test_folder_without_model_is_refused(tmp_path, capsys):
    assert main(["parity", str(tmp_path), "--device", "cpu"]) == 2
    assert "model.onnx does not exist" in capsys.readouterr().err


def _outputs(logits):
    logits = np.asarray(logits, dtype=np.float32).reshape(-1, 1)
    return {"logits": logits, "probability": 1 / (1 + np.exp(-logits))}


def test_compare_counts_boundary_points_and_leaves_them_out_of_label_agreement():
    # A reference within the tolerance of the threshold: an output within tolerance may fall on either side.
    reference = _outputs([-2.0, 0.0, 1e-7, 3.0])
    candidate = _outputs([-2.0, -1e-7, -1e-7, 3.0])
    result = compare(reference, candidate)
    logits = result["outputs"]["logits"]
    assert logits["on_boundary"] == 2
    assert logits["labels_differing_on_boundary"] == 2
    assert logits["labels_differing"] == 0 and logits["label_agreement"] == 1.0
    assert result["outputs"]["probability"]["on_boundary"] == 2
    assert result["passed"] is True


def test_compare_fails_on_a_label_flipped_off_the_boundary():
    result = compare(_outputs([-2.0, 2e-5, 3.0]), _outputs([-2.0, -1e-6, 3.0]))
    logits = result["outputs"]["logits"]
    assert logits["on_boundary"] == 0
    assert logits["labels_differing"] == 1
    assert logits["label_agreement"] == pytest.approx(2 / 3)
    assert result["passed"] is False


def test_compare_fails_on_an_error_over_tolerance_without_label_change():
    result = compare(_outputs([-2.0, 3.0]), _outputs([-2.0, 3.0 + 2e-5]))
    assert result["outputs"]["logits"]["labels_differing"] == 0
    assert result["passed"] is False


def test_compare_counts_relative_error_only_where_the_reference_is_above_1e_3():
    result = compare(_outputs([1e-4, 1.0]), _outputs([2e-4, 1.0 + 1e-6]))
    assert result["outputs"]["logits"]["rel_error_points"] == 1
    assert result["outputs"]["logits"]["max_rel_error"] == pytest.approx(1e-6, rel=0.1)


def test_asking_for_cuda_without_cuda_exits_2(model_folder, cuda_works, capsys):
    if cuda_works:
        pytest.skip("ONNX Runtime has CUDA here")
    assert main(["parity", str(model_folder), "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_auto_without_cuda_checks_cpu_and_reports_cuda_not_run(model_folder, cuda_works):
    if cuda_works:
        pytest.skip("ONNX Runtime has CUDA here")
    result = run_parity(model_folder, device="auto")
    assert [p["path"] for p in result["paths"]] == ["onnxruntime-cpu"]
    assert [u["path"] for u in result["unavailable"]] == ["onnxruntime-cuda", "onnxruntime-cuda-tf32"]
    assert result["passed"] is True


@pytest.mark.gpu
def test_cuda_with_tf32_off_passes_and_tf32_on_is_information_only(model_folder, cuda_works):
    if not cuda_works:
        pytest.skip("no CUDA execution provider")
    result = run_parity(model_folder, device="cuda")
    paths = {p["path"]: p for p in result["paths"]}
    assert paths["onnxruntime-cuda"]["provider"] == "CUDAExecutionProvider"
    assert paths["onnxruntime-cuda"]["passed"] is True and paths["onnxruntime-cuda"]["gating"] is True
    assert paths["onnxruntime-cuda-tf32"]["gating"] is False
    assert result["passed"] is True


def fake_client_module(model_folder, perturb: bool = False):
    """A stand-in for serving.client whose server is an in-process CPU session (optionally one ulp off)."""
    session = open_session(model_folder / "model.onnx", SessionSettings(device="cpu"))
    requests = []

    class InferenceClient:
        def __init__(self, url, model="xor", version="", timeout_s=10.0, retries=3):
            requests.append({"url": url, "model": model, "version": version, "rows": []})

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, x, outputs=None):
            requests[-1]["rows"].append(len(x))
            logits, probability = session.run(["logits", "probability"], {"input": x})
            if perturb:
                logits = np.nextafter(logits, np.float32(np.inf))
            return {"logits": logits, "probability": probability}

    class InferenceError(Exception):
        pass

    module = types.SimpleNamespace(InferenceClient=InferenceClient, InferenceError=InferenceError)
    return module, requests


def test_served_outputs_equal_in_process_bit_for_bit(model_folder, monkeypatch, capsys):
    module, requests = fake_client_module(model_folder)
    monkeypatch.setitem(sys.modules, "serving.client", module)
    assert main(["parity", str(model_folder), "--device", "cpu", "--url", "localhost:8001"]) == 0
    assert "bit-identical to in-process session on: CPUExecutionProvider" in capsys.readouterr().out
    (request,) = requests
    assert (request["url"], request["model"], request["version"]) == ("localhost:8001", "xor", "1")
    assert max(request["rows"]) == 65_536 and sum(request["rows"]) == 1_100_004


def test_served_outputs_one_ulp_off_fail(model_folder, monkeypatch, capsys):
    module, _ = fake_client_module(model_folder, perturb=True)
    monkeypatch.setitem(sys.modules, "serving.client", module)
    assert main(["parity", str(model_folder), "--device", "cpu", "--url", "localhost:8001"]) == 1
    assert "bit-identical to in-process session on: NONE" in capsys.readouterr().out


def copy_model_folder(model_folder, folder):
    folder.mkdir()
    for name in ("state_dict.pt", "model.onnx"):
        shutil.copy(model_folder / name, folder / name)
    return folder


@pytest.mark.parametrize("damaged", ["model.onnx", "state_dict.pt"])
def test_a_damaged_file_is_a_contract_error_in_one_line(model_folder, tmp_path, capsys, damaged):
    folder = copy_model_folder(model_folder, tmp_path / "damaged")
    (folder / damaged).write_bytes((folder / damaged).read_bytes()[:100])
    assert main(["parity", str(folder), "--device", "cpu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("xorserve parity: error: ") and str(folder / damaged) in line


def test_a_state_dict_of_another_model_is_a_contract_error(model_folder, tmp_path, capsys):
    folder = copy_model_folder(model_folder, tmp_path / "other")
    torch.save({"weight": torch.zeros(3)}, folder / "state_dict.pt")
    assert main(["parity", str(folder), "--device", "cpu"]) == 2
    assert "not a XorClassifier state_dict" in capsys.readouterr().err


def test_parity_url_and_json_come_from_parity_scoped_variables(tmp_path, monkeypatch):
    # XORSERVE_URL is where `predict` sends points; it must not add a served path here.
    monkeypatch.setenv("XORSERVE_URL", "127.0.0.1:1")
    monkeypatch.setenv("XORSERVE_JSON", str(tmp_path / "other.json"))
    parser, _ = command_parser("parity")
    args = parser.parse_args(["models/xor/1"])
    assert (args.url, args.json) == (None, None)
    monkeypatch.setenv("XORSERVE_PARITY_URL", "127.0.0.1:8001")
    monkeypatch.setenv("XORSERVE_PARITY_JSON", str(tmp_path / "parity.json"))
    args = command_parser("parity")[0].parse_args(["models/xor/1"])
    assert (args.url, args.json) == ("127.0.0.1:8001", tmp_path / "parity.json")


def test_a_json_path_that_cannot_be_written_exits_2_in_one_line(model_folder, tmp_path, capsys):
    assert main(["parity", str(model_folder), "--device", "cpu", "--json", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write --json {tmp_path}" in line
