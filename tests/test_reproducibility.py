"""Training's reproducibility contract: with pinned numerics (the default), the same seed gives the same
state_dict.pt and model.onnx, byte for byte, on every x86-64 CPU.

One machine cannot be every CPU, but it can be each kernel dispatch a CPU leads PyTorch and MKL to: each
`ATEN_CPU_CAPABILITY` this machine supports and several MKL code paths (`MKL_CBWR`). Every run is a real
`xorserve train` process, since both are chosen once per process. The contrast (`--numerics native`)
shows that the dispatch does change the bytes here, so the pinned runs' equality is not vacuous.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_xorserve

CAPABILITIES = ("default", "avx2", "avx512")
TRAIN = ["--epochs", "10", "--no-plots", "--device", "cpu"]


def xorserve(args, env_overrides):
    """`xorserve ARGS` with the kernel dispatch asked for by `env_overrides` alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    return run_xorserve(*args, env={**env, **env_overrides})


def capability_taken(value: str) -> str:

    env = {**os.environ, "ATEN_CPU_CAPABILITY": value}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


@pytest.fixture(scope="module")
def capabilities():
    """The ATEN_CPU_CAPABILITY values this machine supports (torch takes the value it is given)."""
    return [value for value in CAPABILITIES if capability_taken(value).strip().lower() == value]


def train_folder(tmp_path, name, env, numerics="pinned"):
    out = tmp_path / name
    result = xorserve(["train", "--out", str(out), "--numerics", numerics, *TRAIN], env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def contents(folder):
    """The files the contract covers, and report.json without its parity section (ONNX Runtime's own CPU kernels)."""
    report = json.loads((folder / "report.json").read_text())
    report.pop("parity")
    return {
        "state_dict.pt": (folder / "state_dict.pt").read_bytes(),
        "model.onnx": (folder / "model.onnx").read_bytes(),
        "report.json without parity": report,
    }


@pytest.mark.slow
def test_pinned_training_gives_the_same_bytes_under_every_kernel_dispatch(capabilities, tmp_path):
    # Each run asks for other kernels, as a user's environment or another CPU would.
    environments = [{"ATEN_CPU_CAPABILITY": value} for value in capabilities]
    environments += [{"ATEN_CPU_CAPABILITY": capabilities[-1], "MKL_CBWR": "AUTO"}]
    environments += [{"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": v.upper()} for v in capabilities[1:]]
    folders = [train_folder(tmp_path, f"run{i}", env) for i, env in enumerate(environments)]
    first = contents(folders[0])
    for folder, env in zip(folders[1:], environments[1:], strict=True):
        assert contents(folder) == first, f"bytes differ under {env}"
    numerics = first["report.json without parity"]["numerics"]
    assert numerics == {
        "mode": "pinned",
        "cpu_capability": "DEFAULT",
        "mkl_cbwr": "COMPATIBLE",
        "threads": 1,
        "pinned": True,
    }


@pytest.mark.slow
def test_native_numerics_change_the_bytes_with_the_kernels(capabilities, tmp_path):
    if len(capabilities) < 2:
        pytest.skip(f"this CPU offers only ATen's {capabilities} kernels; the contrast needs two")
    default = train_folder(tmp_path, "default", {"ATEN_CPU_CAPABILITY": "default"}, numerics="native")
    best = train_folder(tmp_path, "best", {"ATEN_CPU_CAPABILITY": capabilities[-1]}, numerics="native")
    assert (default / "state_dict.pt").read_bytes() != (best / "state_dict.pt").read_bytes()
    numerics = json.loads((best / "report.json").read_text())["numerics"]
    assert numerics["mode"] == "native" and numerics["pinned"] is False
    assert numerics["cpu_capability"] == capabilities[-1].upper()


@pytest.mark.slow
def test_parity_of_a_10_epoch_model_passes_and_reports_its_boundary_points(tmp_path):
    # Ten epochs leave a model near chance (about 65 % here): its boundary crosses the grid everywhere.
    folder = train_folder(tmp_path, "ten", {})
    result = xorserve(["parity", str(folder), "--device", "cpu", "--json", str(tmp_path / "parity.json")], {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on boundary" in result.stdout
    for output in json.loads((tmp_path / "parity.json").read_text())["paths"][0]["outputs"].values():
        assert output["labels_differing"] == 0
        assert output["on_boundary"] >= output["labels_differing_on_boundary"] >= 0


@pytest.mark.slow
def test_train_writes_a_few_plain_progress_lines_when_not_on_a_terminal(tmp_path):
    result = xorserve(["train", "--out", str(tmp_path / "1"), "--epochs", "25", "--no-plots", "--device", "cpu"], {})
    assert result.returncode == 0, result.stderr[-2000:]
    progress = [line for line in result.stderr.splitlines() if line.startswith("train: epoch")]
    assert 1 < len(progress) <= 10 and progress[-1].startswith("train: epoch 25/25 loss=")
    assert "\r" not in result.stderr
