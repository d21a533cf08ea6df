"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every command, flag and path is real."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from serving.cli.main import COMMANDS, command_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"trainer", "server", "locust-master", "locust-worker"}
PROFILED = {"server-tls": "tls"}  # services that start only with their profile (`--profile tls`)
# What `locust` makes of a command line with our locustfile loaded (its custom options included).
LOCUST_PARSE = """
import json, sys
from locust.argument_parser import parse_options
from locust.util.load_locustfile import load_locustfile
load_locustfile(sys.argv[1])
options = parse_options(sys.argv[2:])
print(json.dumps({key: value for key, value in vars(options).items() if isinstance(value, (str, int, float, bool))}))
"""


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> dict[str, list[str]]:
    """Dockerfile stage name -> its instruction lines (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = found.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
    return found


def parse_xorserve(command: list[str]) -> argparse.Namespace:
    """Parse `xorserve CMD ARGS` the way serving.cli does, without running the command."""
    assert command[0] == "xorserve"
    assert command[1] in COMMANDS, f"{command[1]!r} is not an xorserve command"
    parser, _ = command_parser(command[1])
    return parser.parse_args(command[2:])


def parse_locust(command: list[str]) -> dict:
    assert command[:2] == ["locust", "-f"]
    locustfile = ROOT / command[2]
    assert locustfile.is_file(), f"{command[2]} does not exist"
    result = subprocess.run(
        [sys.executable, "-c", LOCUST_PARSE, str(locustfile), *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def container_ports(service: dict) -> set[int]:
    return {int(str(mapping).rsplit(":", 1)[-1]) for mapping in service.get("ports", [])}


def test_compose_file_declares_the_four_services_the_tls_profile_and_the_model_volume(compose, services):
    assert set(services) == SERVICES | set(PROFILED)
    assert {name: services[name].get("profiles") for name in PROFILED} == {n: [p] for n, p in PROFILED.items()}
    assert not any(services[name].get("profiles") for name in SERVICES)  # the default set starts as before
    assert "models" in compose["volumes"]


def test_the_tls_server_serves_tls_with_tokens_from_the_mounted_folder_and_its_probe_uses_the_ca(services):
    tls = services["server-tls"]
    served = parse_xorserve(tls["command"])
    assert served.host == "0.0.0.0" and container_ports(tls) == {8001, 8002}
    assert "./tls:/tls:ro" in tls["volumes"] and "models:/models:ro" in tls["volumes"]
    assert (served.tls_cert, served.tls_key, served.auth_token_file) == (
        Path("/tls/server.pem"),
        Path("/tls/server.key"),
        Path("/tls/token"),
    )
    published = {port.split(":")[0] for port in tls["ports"]}
    assert published == {"8443", "8444"}  # beside the plaintext server's 8001 and 8002
    probe = tls["healthcheck"]["test"]
    assert probe[0] == "CMD"
    checked = parse_xorserve(probe[1:])
    assert checked.tls_ca == Path("/tls/ca.pem") and checked.token_file is None  # health stays open
    # The rest is the plaintext server's (a YAML merge): the same image, GPU and restart policy.
    for key in ("image", "deploy", "restart", "stop_grace_period", "depends_on"):
        assert tls[key] == services["server"][key], key


@pytest.mark.parametrize("name", ["trainer", "server"])
def test_xorserve_commands_are_real_subcommands_whose_flags_parse(services, name):
    parse_xorserve(services[name]["command"])


def test_trainer_writes_the_model_into_the_volume_the_server_reads(services):
    trained = parse_xorserve(services["trainer"]["command"])
    served = parse_xorserve(services["server"]["command"])
    assert Path(trained.out).parts[-2:] == ("xor", "1")
    assert Path(trained.out).parent.parent == Path(served.model_repository)
    assert f"models:{served.model_repository}" in services["trainer"]["volumes"]
    assert f"models:{served.model_repository}:ro" in services["server"]["volumes"]


def test_server_listens_on_all_interfaces_at_the_published_ports(services):
    served = parse_xorserve(services["server"]["command"])
    assert served.host == "0.0.0.0"
    assert container_ports(services["server"]) == {served.port, served.metrics_port} == {8001, 8002}


def test_server_starts_after_the_trainer_succeeded_on_a_reserved_gpu(services):
    server = services["server"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert server["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert parse_xorserve(server["command"]).device == "cuda"


@pytest.mark.slow
def test_locust_master_parses_and_targets_the_server(services):
    master = parse_locust(services["locust-master"]["command"])
    served = parse_xorserve(services["server"]["command"])
    assert master["master"] is True
    assert master["host"] == f"server:{served.port}"
    assert container_ports(services["locust-master"]) == {master["web_port"]} == {8089}
    assert services["locust-master"]["depends_on"]["server"]["condition"] == "service_healthy"


@pytest.mark.slow
def test_locust_workers_parse_and_join_the_master(services):
    worker = parse_locust(services["locust-worker"]["command"])
    assert worker["worker"] is True
    assert worker["master_host"] == "locust-master"
    # Scaling with --scale needs workers without fixed host ports or names.
    assert "ports" not in services["locust-worker"]
    assert "container_name" not in services["locust-worker"]


def test_server_restarts_after_a_crash_a_bounded_number_of_times(services):
    # Without a GPU, `--device cuda` fails at every start: an unbounded policy would restart it forever.
    policy = services["server"]["restart"]
    match = re.fullmatch(r"on-failure:(\d+)", policy)
    assert match, f"restart: {policy}"
    assert 1 <= int(match.group(1)) <= 10


# `docker compose run` options that take a value; the others used here are flags.
RUN_VALUE_OPTIONS = {"-v", "--volume", "-u", "--user", "-e", "--env", "-w", "--workdir", "--name", "--entrypoint"}


def compose_run_examples() -> list[str]:
    """The `docker compose run ...` command lines in docker-compose.yml's header comment."""
    comment = "\n".join(line[1:] for line in COMPOSE.read_text().splitlines() if line.startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", comment)
    return [part.strip() for line in joined.splitlines() for part in line.split("&&") if "compose run" in part]


def parse_compose_run(line: str) -> tuple[dict[str, list[str]], str, list[str]]:
    """(options, service, command) of one `docker compose run` line."""
    tokens = shlex.split(line, comments=True)
    assert tokens[:3] == ["docker", "compose", "run"], line
    options: dict[str, list[str]] = {}
    rest = tokens[3:]
    while rest[0].startswith("-"):
        name = rest.pop(0)
        options.setdefault(name, []).append(rest.pop(0) if name in RUN_VALUE_OPTIONS else "")
    return options, rest[0], rest[1:]


def test_headless_loadtest_example_keeps_its_results_on_the_host(services):
    (line,) = compose_run_examples()
    options, service, command = parse_compose_run(line)
    assert service in services
    args = parse_xorserve(command)
    assert command[1] == "loadtest"
    assert args.url == "server:8001"
    mounts = [volume.split(":") for volume in options.get("-v", []) + options.get("--volume", [])]
    # A bind mount of a host folder (not a named volume) that holds --out; written as the host user.
    assert any(host.startswith(("$PWD", ".", "/")) and Path(args.out).is_relative_to(inside) for host, inside in mounts)
    assert options.get("--user") or options.get("-u")


def test_packages_the_dockerfile_names_are_pinned_by_constraints(stages):
    pinned = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = []
    for line in (line for instructions in stages.values() for line in instructions):
        for install in re.findall(r"pip install ([^&]+)", line):
            for token in shlex.split(install):
                if token.startswith("-") or token == "constraints.txt":
                    continue
                if token.startswith("."):  # the project: its extras' requirements
                    for extra in re.findall(r"\[(.*)\]", token)[0].split(",") if "[" in token else []:
                        named += extras[extra]
                else:
                    named.append(token)
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower() for requirement in named}
    assert names and names <= pinned, names - pinned


def test_every_build_names_an_existing_dockerfile_stage(services, stages):
    for name, service in services.items():
        build = service["build"]
        assert (ROOT / build["context"]).is_dir(), name
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        assert build["target"] in stages, f"{name}: no stage {build['target']!r}"


def copied_sources(stages: dict[str, list[str]]) -> list[str]:
    sources = []
    for instructions in stages.values():
        for line in instructions:
            if line.upper().startswith("COPY") and "--from" not in line:
                sources += line.split()[1:-1]
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins, `!` re-includes)."""
    ignored = False
    parts = Path(path).parts
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        # A pattern that matches a folder matches everything under it.
        if any(fnmatch.fnmatchcase("/".join(parts[: end + 1]), pattern) for end in range(len(parts))):
            ignored = not negated
    return ignored


def test_dockerfile_copies_only_existing_paths(stages):
    for source in copied_sources(stages):
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_dockerignore_lets_every_copied_path_through(stages):
    for source in copied_sources(stages):
        assert not dockerignored(source.rstrip("/")), f"COPY source {source} is excluded by .dockerignore"
    # ... and keeps the rest out: the virtual environment, the git history, the models (a volume's job).
    assert all(dockerignored(path) for path in (".venv", ".git", "models", "out", "serving/__pycache__"))


def test_images_run_as_a_non_root_user(services, stages):
    for target in {service["build"]["target"] for service in services.values()}:
        users = [line.split()[1] for line in stages[target] if line.upper().startswith("USER ")]
        assert users, f"stage {target} sets no USER"
        assert users[-1] not in ("root", "0"), target


def test_server_image_installs_no_torch_and_brings_cuda_libraries(stages):
    installs = " ".join(line for line in stages["server"] if line.upper().startswith("RUN"))
    assert "torch" not in installs
    assert "[train" not in installs
    assert "onnxruntime-gpu[cuda,cudnn]" in installs
    assert "-c constraints.txt" in installs


def test_healthcheck_passes_against_a_running_server(services, server):
    result = run_healthcheck(services["server"]["healthcheck"]["test"], server.grpc_port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout


def test_healthcheck_fails_against_a_stopped_server(services, server_factory):
    handle = server_factory()
    port = handle.grpc_port
    handle.stop()
    result = run_healthcheck(services["server"]["healthcheck"]["test"], port)
    assert result.returncode == 3  # no answer: the server could not be reached
    assert "UNAVAILABLE" in result.stdout


def run_healthcheck(test: list[str], port: int) -> subprocess.CompletedProcess:
    """The compose healthcheck's command, pointed at `port` instead of the container's 8001."""
    assert test[:3] == ["CMD", "xorserve", "health"]
    args = [sys.executable, "-m", "serving.cli", *test[2:]]
    args[args.index("--url") + 1] = f"127.0.0.1:{port}"
    return subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=ROOT)


def docker_compose_version() -> tuple[int, ...] | None:
    """The version of the docker-compose on PATH, or None without one."""
    if shutil.which("docker-compose") is None:
        return None
    done = subprocess.run(["docker-compose", "version", "--short"], capture_output=True, text=True, timeout=60)
    numbers = re.findall(r"\d+", done.stdout.strip().lstrip("v"))
    return tuple(int(n) for n in numbers[:2]) if done.returncode == 0 and numbers else None


def test_docker_compose_validates_the_file_offline():
    version = docker_compose_version()
    if version is None or version < (1, 29):
        pytest.skip(f"needs docker-compose 1.29 or newer (Debian's); found {version or 'none'}")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
