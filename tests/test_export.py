"""ONNX export: the contract's input and outputs, the checker, provenance, no embedded paths, reproducibility."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.cli.main import command_parser, main
from trainer.export import export_state_dict
from trainer.model import XorClassifier

TRAINING = {"seed": 5, "train_size": 2500, "test_size": 500, "std": 0.1, "epochs": 100, "lr": 0.1, "batch_size": 128}


def save_classifier(path, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XorClassifier()
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seeded classifier's state_dict and its export, with training provenance."""
    folder = tmp_path_factory.mktemp("export")
    model = save_classifier(folder / "state_dict.pt", seed=5)
    path = export_state_dict(
        folder / "state_dict.pt", folder / "model.onnx", "xor", "3", training=TRAINING, test_accuracy=0.998
    )
    return model, folder, path


@pytest.fixture(scope="module")
def onnx_model(exported):
    return onnx.load(exported[2])


def test_export_passes_the_full_onnx_checker(exported):
    onnx.checker.check_model(onnx.load(exported[2]), full_check=True)


def _shape(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_input_is_float_input_with_a_dynamic_batch_axis(onnx_model):
    (graph_input,) = onnx_model.graph.input
    assert graph_input.name == "input"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _shape(graph_input) == ["batch", 2]


def test_outputs_are_float_logits_and_probability_per_point(onnx_model):
    outputs = {o.name: o for o in onnx_model.graph.output}
    assert list(outputs) == ["logits", "probability"]
    for output in outputs.values():
        assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert _shape(output) == ["batch", 1]


def test_probability_is_computed_by_a_sigmoid_in_the_graph(onnx_model):
    (node,) = [n for n in onnx_model.graph.node if "probability" in n.output]
    assert node.op_type == "Sigmoid" and list(node.input) == ["logits"]


def test_ir_version_is_at_most_10_and_opset_is_recorded(onnx_model):
    assert onnx_model.ir_version <= 10
    (opset,) = [o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")]
    assert dict((p.key, p.value) for p in onnx_model.metadata_props)["opset"] == str(opset)


def test_weights_are_inline(exported, onnx_model):
    _, folder, _ = exported
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in onnx_model.graph.initializer)
    assert {t.name for t in onnx_model.graph.initializer} == {
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
    }
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "state_dict.pt"]


def test_metadata_records_the_provenance(exported, onnx_model):
    _, folder, _ = exported
    props = {p.key: p.value for p in onnx_model.metadata_props}
    assert props["model_name"] == "xor" and props["model_version"] == "3"
    assert props["seed"] == "5" and props["train_size"] == "2500" and props["dataset_std"] == "0.1"
    assert props["epochs"] == "100" and props["learning_rate"] == "0.1" and props["batch_size"] == "128"
    assert props["test_accuracy"] == "0.998"
    assert props["torch_version"] == torch.__version__ and props["onnx_version"] == onnx.__version__
    assert props["state_dict_sha256"] == hashlib.sha256((folder / "state_dict.pt").read_bytes()).hexdigest()


def test_no_source_paths_or_stack_traces_are_embedded(exported, onnx_model):
    _, folder, path = exported
    content = path.read_bytes()
    for needle in (str(folder).encode(), b".py", b"stack_trace", b'File "', b"fx_node", b"pkg.torch"):
        assert needle not in content, needle
    graph = onnx_model.graph
    for proto in [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        assert not proto.metadata_props and not proto.doc_string, proto.name


def test_same_state_dict_exports_byte_identical_files(exported, tmp_path):
    _, folder, path = exported
    again = export_state_dict(
        folder / "state_dict.pt", tmp_path / "model.onnx", "xor", "3", training=TRAINING, test_accuracy=0.998
    )
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("batch", [1, 3, 1000])
def test_onnx_runtime_gives_pytorchs_outputs_for_any_batch_size(exported, batch):
    model, _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).uniform(-0.5, 1.5, (batch, 2)).astype(np.float32)
    logits, probability = session.run(["logits", "probability"], {"input": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert logits.shape == probability.shape == (batch, 1)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probability, torch.sigmoid(torch.from_numpy(expected)).numpy(), atol=1e-6, rtol=0)


def test_export_command_takes_provenance_from_the_report_beside_the_state_dict(tmp_path):
    save_classifier(tmp_path / "state_dict.pt", seed=6)
    (tmp_path / "report.json").write_text(json.dumps({"settings": TRAINING, "test_accuracy": 1.0}))
    assert main(["export", str(tmp_path / "state_dict.pt"), "--out", str(tmp_path / "out" / "model.onnx")]) == 0
    props = {p.key: p.value for p in onnx.load(tmp_path / "out" / "model.onnx").metadata_props}
    assert props["seed"] == "5" and props["test_accuracy"] == "1.0"


def test_export_command_without_a_report_records_what_it_knows(tmp_path):
    save_classifier(tmp_path / "state_dict.pt", seed=6)
    assert main(["export", str(tmp_path / "state_dict.pt"), "--out", str(tmp_path / "model.onnx")]) == 0
    props = {p.key: p.value for p in onnx.load(tmp_path / "model.onnx").metadata_props}
    assert "seed" not in props and "test_accuracy" not in props
    assert props["state_dict_sha256"] == hashlib.sha256((tmp_path / "state_dict.pt").read_bytes()).hexdigest()


def test_export_command_refuses_a_missing_state_dict(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_export_command_names_the_model_after_its_repository_folder(tmp_path):
    save_classifier(tmp_path / "state_dict.pt", seed=6)
    out = tmp_path / "repository" / "adder" / "7" / "model.onnx"
    assert main(["export", str(tmp_path / "state_dict.pt"), "--out", str(out)]) == 0
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert (props["model_name"], props["model_version"]) == ("adder", "7")


def test_export_command_refuses_a_damaged_state_dict_in_one_line(tmp_path, capsys):
    save_classifier(tmp_path / "full.pt", seed=6)
    (tmp_path / "state_dict.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    assert main(["export", str(tmp_path / "state_dict.pt"), "--out", str(tmp_path / "model.onnx")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(tmp_path / "state_dict.pt") in line and "not a readable state_dict" in line
    assert not (tmp_path / "model.onnx").exists()


def test_export_command_refuses_an_out_that_is_a_folder(tmp_path, capsys):
    save_classifier(tmp_path / "state_dict.pt", seed=6)
    assert main(["export", str(tmp_path / "state_dict.pt"), "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is a folder" in line and str(tmp_path / "model.onnx") in line


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"settings": [1], "test_accuracy": 1.0}', "'settings' is a JSON list"),
        ('{"settings": {}, "test_accuracy": "high"}', "'test_accuracy' is 'high'"),
    ],
)
def test_export_command_refuses_a_malformed_report_in_one_line(tmp_path, capsys, content, reason):
    save_classifier(tmp_path / "state_dict.pt", seed=6)
    (tmp_path / "report.json").write_text(content)
    assert main(["export", str(tmp_path / "state_dict.pt"), "--out", str(tmp_path / "model.onnx")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(tmp_path / "report.json") in line and reason in line
    assert not (tmp_path / "model.onnx").exists()


def test_export_out_comes_from_xorserve_export_out_not_xorserve_out(tmp_path, monkeypatch):
    monkeypatch.setenv("XORSERVE_OUT", str(tmp_path / "xor" / "1"))
    monkeypatch.setenv("XORSERVE_EXPORT_OUT", str(tmp_path / "model.onnx"))
    parser, _ = command_parser("export")
    assert parser.parse_args(["state_dict.pt"]).out == tmp_path / "model.onnx"


def test_export_writes_no_temporary_file_beside_the_model(exported):
    _, folder, _ = exported
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
