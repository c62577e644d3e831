"""deploy/compose.yaml, checked part by part (Docker with GPUs is not available here).

Its vLLM commands must be what the h100-pair launch profile prints, and the Tandem
environment must be valid settings that point at the compose services, with the stores
shared and the engine priority matching the servers' scheduling policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from graph.settings import load_settings
from serving.launch import build_command, export_lines, load_profile, priority_scheduling
from serving.roles import ROLES

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return loaded


def test_vllm_services_run_the_launch_profiles_commands() -> None:
    services = _compose()["services"]
    profile = load_profile("h100-pair")
    for role in ROLES:
        expected = build_command(profile, role, "python")[2:]  # the image runs `vllm serve`
        expected[expected.index("--host") + 1] = "0.0.0.0"  # reachable from other containers
        expected[expected.index("--served-model-name") + 1] = f"tandem-{role}"
        assert services[f"vllm-{role}"]["command"] == expected, role
        gpu = profile.server(role).gpu
        devices = services[f"vllm-{role}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [str(gpu)]


def test_tandem_environment_is_valid_settings_for_these_services() -> None:
    services = _compose()["services"]
    env = {
        k: str(v).replace("${TANDEM_PG_PASSWORD}", "pw")
        for k, v in services["tandem-api"]["environment"].items()
    }
    settings = load_settings(
        **{k.removeprefix("TANDEM_").lower(): v for k, v in env.items() if k.startswith("TANDEM_")}
    )
    profile = load_profile("h100-pair")
    for role in ROLES:
        url = getattr(settings, f"{role}_url")
        port = profile.server(role).port
        assert url == f"http://vllm-{role}:{port}/v1"
        assert getattr(settings, f"{role}_model") == f"tandem-{role}"
    # What `tandem serve --print` exports for the profile, the compose file sets too.
    names = {role: f"tandem-{role}" for role in ROLES}
    for line in export_lines(profile, names):
        for item in line.removeprefix("export ").split():
            key, _, value = item.partition("=")
            if key.endswith("_URL"):
                continue  # loopback in the profile, service names here
            assert env[key] == value, key
    assert settings.engine_priority is all(
        priority_scheduling(profile.server(role).extra_args) for role in ROLES
    )
    assert settings.admission_url is not None and settings.checkpoint_url is not None
    assert str(settings.workspace) in services["tandem-api"]["volumes"][0]
