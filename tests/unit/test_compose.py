"""docker-compose.yml: it validates, and it wires a run the way the controller expects.

``docker-compose config`` (Debian's docker-compose 1.29) resolves and validates the file without
a Docker engine. From its output the tests check that every worker role is attached by URL (a
service name and the port that service listens on), that the token is required and shared, and
that the settings each worker builds from its own command line are the ones the controller
would have given it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from asyncflow.config import load_config
from asyncflow.roles.settings import role_settings
from asyncflow.workers.__main__ import parse_args, resolve_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
WORKER_ROLES = ("rollout", "reward", "actor")
TOKEN = "compose-test-token"

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (scripts/test.sh installs Debian's package)",
)


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCFLOW_")}
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    out = compose_config(ASYNCFLOW_TOKEN=TOKEN)
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    found: dict[str, Any] = tree["services"]
    return found


def argv(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]


def controller_overrides(services: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The controller's ``--config`` and its dotted overrides."""
    args = argv(services["controller"])
    assert args[0] == "controller"
    config, overrides, rest = None, [], args[1:]
    while rest:
        item = rest.pop(0)
        if item == "--config":
            config = rest.pop(0)
        elif "=" in item and not item.startswith("-"):
            overrides.append(item)
    return config, overrides


def test_compose_file_validates_with_the_four_services(services: dict[str, Any]) -> None:
    assert set(services) == {"controller", *WORKER_ROLES}


def test_a_token_is_required() -> None:
    out = compose_config()
    assert out.returncode != 0
    assert "set a token" in out.stderr


def test_every_service_shares_the_token(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        assert svc["environment"]["ASYNCFLOW_TOKEN"] == TOKEN, name


def test_every_worker_role_is_attached_by_url(services: dict[str, Any]) -> None:
    _, overrides = controller_overrides(services)
    given = dict(o.split("=", 1) for o in overrides)
    for role in WORKER_ROLES:
        urls = yaml.safe_load(given[f"{role}.urls"])
        assert isinstance(urls, list) and len(urls) == 1, role
        url = urlsplit(urls[0])
        assert url.hostname == role  # the service's DNS name on the compose network
        worker = parse_args(argv(services[role])[1:])
        assert argv(services[role])[0] == "worker"
        assert worker.role == role
        assert worker.host == "0.0.0.0" and worker.port == url.port
        assert role in services["controller"]["depends_on"]
        assert services[role]["healthcheck"]["test"]  # ready before the controller starts


def test_weight_sync_port_is_fixed(services: dict[str, Any]) -> None:
    _, overrides = controller_overrides(services)
    ports = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("sync.port=")]
    assert ports and ports[-1] > 0


def mounts(service: dict[str, Any]) -> set[str]:
    found = set()
    for v in service.get("volumes", []):
        found.add(v["target"] if isinstance(v, dict) else v.split(":")[1])
    return found


def test_controller_and_actor_share_the_run_directory(services: dict[str, Any]) -> None:
    _, overrides = controller_overrides(services)
    out_dir = [o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir=")][-1]
    assert out_dir in mounts(services["controller"]) and out_dir in mounts(services["actor"])


def test_every_service_sees_the_models_folder_and_workers_restart(
    services: dict[str, Any],
) -> None:
    """A preset whose model.path is a folder (configs/smollm2.yaml: models/smollm2-135m,
    relative to the image's /app) finds it in every container; a failed worker is restarted,
    and the controller waits for it at its URL."""
    for name in (*WORKER_ROLES, "controller"):
        assert "/app/models" in mounts(services[name]), name
    for role in WORKER_ROLES:
        assert services[role].get("restart") == "on-failure", role


def assert_settings_agree(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config, overrides = controller_overrides(services)
    cfg = load_config(ROOT / config if config else None, overrides)
    expected = role_settings(cfg)
    for role in WORKER_ROLES:
        args = parse_args(argv(services[role])[1:])
        if args.config is not None:
            args.config = str(ROOT / args.config)
        settings, _ = resolve_settings(args)
        assert settings == expected[role], role
    return expected


def test_workers_build_the_settings_the_controller_would_give(services: dict[str, Any]) -> None:
    assert_settings_agree(services)


def test_overrides_reach_every_service_alike() -> None:
    out = compose_config(
        ASYNCFLOW_TOKEN=TOKEN,
        ASYNCFLOW_CONFIG="configs/transformers-engine.yaml",
        ASYNCFLOW_OVERRIDES="algorithm.steps=5 actor.lr=1e-5 rollout.max_new_tokens=16",
    )
    assert out.returncode == 0, out.stderr
    settings = assert_settings_agree(yaml.safe_load(out.stdout)["services"])
    assert settings["rollout"].engine == "transformers"
    assert settings["rollout"].sampling.max_new_tokens == 16
    assert settings["actor"].lr == 1e-5
