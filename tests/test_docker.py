"""docker/: the trainer and server images pass hadolint, the compose file is valid Compose and wires a safe
tracking server, and scripts/tracking_server.sh (what CI runs natively) starts MLflow as compose does."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BIN

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCRIPT = ROOT / "scripts" / "tracking_server.sh"
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
# A compose variable: $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}.
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """``value`` as ``docker compose`` resolves it with ``env`` as the .env file (the spec's subset we use)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise ValueError(f"{name}: {arg}")
        return arg or ""

    return VARIABLE.sub(substitute, value)


def resolved(node: Any, env: dict[str, str]) -> Any:
    """Every string in a parsed compose document, interpolated."""
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker/compose.yaml as written (variables not resolved)."""
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    lines = DOCKER.joinpath(".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def flags(command: list[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--switch`` pairs of a command line."""
    options: dict[str, str | None] = {}
    for index, token in enumerate(command):
        if token.startswith("--"):
            following = command[index + 1] if index + 1 < len(command) else None
            options[token] = None if following is None or following.startswith("--") else following
    return options


def script_mlflow_command() -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the ``mlflow server`` command line scripts/tracking_server.sh runs."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if re.search(r"\bsetsid .*/mlflow\"? server ", line)]
    tokens = shlex.split(line[: line.index(">")])
    server = tokens.index("server")
    assignments = dict(token.split("=", 1) for token in tokens[:server] if re.fullmatch(r"[A-Z_]+=.*", token))
    return assignments, tokens[server - 1:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout) == [], result.stdout
    assert result.returncode == 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_hadolint_ignore_says_why(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if match := re.match(r"# hadolint ignore=([\w,]+)", line):
            reasons = "\n".join(lines[max(0, number - 5):number])
            for rule in match.group(1).split(","):
                assert f"{rule}:" in reasons, f"{dockerfile.name}:{number + 1}: ignore of {rule} without a reason"


def test_both_images_are_there_and_run_as_a_non_root_user() -> None:
    assert {path.name for path in DOCKERFILES} == {"Dockerfile", "mlflow.Dockerfile"}
    for dockerfile in DOCKERFILES:
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        assert users and users[-1].split(":")[0] not in ("root", "0"), dockerfile.name


def test_trainer_image_is_cpu_by_default_installs_like_make_setup_and_runs_metalab_train() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r"^RUN make PYTHON=python3\.11 setup$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["/opt/metalab/.venv/bin/metalab-train"]' in text
    # The build context is the checkout: a host .venv or run outputs must not be copied in.
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".cache", "mlflow.db", "docker/.env"} <= set(ignored)


def test_server_image_pins_mlflow_and_the_driver_as_the_lock_does() -> None:
    text = (DOCKER / "mlflow.Dockerfile").read_text()
    lock = set((ROOT / "requirements" / "lock.txt").read_text().split())
    pins = set(re.findall(r"\b(mlflow==\S+|psycopg2-binary==\S+)", text))
    assert len(pins) == 2 and pins <= lock
    assert "--constraint /tmp/lock.txt" in text


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthcheckk:", 1))
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "healthcheckk" in result.stdout


def test_mlflow_server_uses_postgres_from_env_and_proxies_artifacts(compose: dict[str, Any]) -> None:
    env = {"POSTGRES_USER": "lab", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "runs"}
    mlflow = resolved(compose, env)["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://lab:s3cret@db:5432/runs"
    assert mlflow["command"][:2] == ["mlflow", "server"]
    options = flags(mlflow["command"])
    assert options["--artifacts-destination"] == "/artifacts" and "--serve-artifacts" in options
    assert "--default-artifact-root" not in options  # new experiments get mlflow-artifacts:/ (proxied) roots
    assert options["--host"] == "0.0.0.0" and options["--port"] == "5000"
    assert "mlflow:5000" in options["--allowed-hosts"].split(",")  # the trainer's Host header
    db = resolved(compose, env)["services"]["db"]["environment"]
    assert db == {"POSTGRES_USER": "lab", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "runs"}


def test_compose_refuses_to_start_without_a_password(compose: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        resolved(compose, {})
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        resolved(compose, {"POSTGRES_PASSWORD": ""})  # the .env.example as shipped


def test_ui_is_published_on_loopback_only_by_default(compose: dict[str, Any]) -> None:
    services = resolved(compose, {"POSTGRES_PASSWORD": "x"})["services"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert resolved(compose, {"POSTGRES_PASSWORD": "x", "MLFLOW_PORT": "5099"})["services"]["mlflow"]["ports"] == \
        ["127.0.0.1:5099:5000"]
    assert "ports" not in services["db"] and "ports" not in services["trainer"]


def test_database_and_artifacts_live_on_named_volumes(compose: dict[str, Any]) -> None:
    mounts = {service: dict(volume.split(":")[::-1] for volume in compose["services"][service]["volumes"])
              for service in ("db", "mlflow")}
    assert mounts["db"]["/var/lib/postgresql/data"] in compose["volumes"]
    assert mounts["mlflow"]["/artifacts"] in compose["volumes"]


def test_the_database_holds_optuna_s_studies_apart_from_mlflow_s_runs(compose: dict[str, Any]) -> None:
    """Both the compose file's PostgreSQL and the native script's create the `optuna` database (its own: Optuna and
    MLflow both keep an `alembic_version` table)."""
    mounts = dict(volume.split(":")[::-1] for volume in compose["services"]["db"]["volumes"])
    init = DOCKER / mounts["/docker-entrypoint-initdb.d"]
    assert [p.read_text().split("\n")[-2] for p in init.glob("*.sql")] == ["CREATE DATABASE optuna;"]
    script = (ROOT / "scripts" / "tracking_server.sh").read_text()
    assert 'OPTUNA_DB="${OPTUNA_DB:-optuna}"' in script and 'for db in "$POSTGRES_DB" "$OPTUNA_DB"' in script


def test_services_wait_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert "http://127.0.0.1:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert services["mlflow"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["trainer"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}


def test_trainer_tracks_to_the_mlflow_service(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (DOCKER / trainer["build"]["context"]).resolve() == ROOT
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile"


def test_no_secret_is_committed(compose: dict[str, Any]) -> None:
    def secrets(node: Any, key: str = "") -> list[tuple[str, Any]]:
        if isinstance(node, dict):
            return [found for k, v in node.items() for found in secrets(v, str(k))]
        if isinstance(node, list):
            return [found for item in node for found in secrets(item, key)]
        return [(key, node)] if re.search(r"PASSWORD|SECRET|TOKEN", key) else []

    found = secrets(compose)
    assert found and all(re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)) for _, value in found), found
    # The only place the password enters a URI is the same required variable.
    assert re.findall(r":(\$\{POSTGRES_PASSWORD[^}]*\})@", COMPOSE.read_text())
    assert env_example()["POSTGRES_PASSWORD"] == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, "docker/.env (the lab's credentials) must be git-ignored"


def test_env_example_names_are_the_ones_compose_and_the_script_read(compose: dict[str, Any]) -> None:
    names = set(env_example())
    compose_names = {match.group("name") for match in VARIABLE.finditer(COMPOSE.read_text()) if match.group("name")}
    script_names = set(re.findall(r"\$\{(\w+):-", SCRIPT.read_text()))  # read as ${NAME:-default}
    assert names == compose_names
    assert names <= script_names, names - script_names


def test_native_script_starts_mlflow_with_the_compose_file_s_options(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    assignments, command = script_mlflow_command()
    assert command[0].endswith(".venv/bin/mlflow") and command[1] == "server"
    assert set(flags(command)) == set(flags(mlflow["command"]))
    server_environment = {name for name in mlflow["environment"] if name.startswith("MLFLOW_")}
    assert set(assignments) == server_environment == {"MLFLOW_BACKEND_STORE_URI"}
    scheme = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].split("://")[0]
    assert assignments["MLFLOW_BACKEND_STORE_URI"].startswith(f"{scheme}://$POSTGRES_USER:")
    # Natively the server itself binds loopback; in compose it listens in its container, published on loopback.
    assert flags(command)["--host"] == "127.0.0.1"


def test_native_script_says_how_to_use_it() -> None:
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "usage:" in result.stderr and "start|stop" in result.stderr
