"""The Grafana dashboard imports with a datasource input and filters every panel by job."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from serving.launch import load_profile

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "routing" / "grafana" / "tandem-dashboard.json"
SCRAPE_CONFIG = ROOT / "docs" / "prometheus.yml"
_SELECTOR = re.compile(r"((?:vllm:|tandem_)[a-z_]+)(\{[^}]*\})?")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_import_asks_for_the_prometheus_datasource() -> None:
    dashboard = _dashboard()
    (source,) = dashboard["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == "${" + source["name"] + "}"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_series_is_filtered_by_the_job_variables() -> None:
    dashboard = _dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "model_name", "tandem_job", "role"} <= variables
    selectors = [m for expr in _exprs(dashboard) for m in _SELECTOR.finditer(expr)]
    assert len(selectors) > 20
    for match in selectors:
        name, labels = match.group(1), match.group(2) or ""
        if name.startswith("vllm:"):
            assert 'job=~"$job"' in labels and 'model_name=~"$model_name"' in labels, name
        else:
            assert 'job=~"$tandem_job"' in labels, name


def test_scrape_config_names_both_servers_and_tandem() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"vllm-reasoning", "vllm-coder", "tandem"}
    targets = {name: job["static_configs"][0]["targets"][0] for name, job in jobs.items()}
    profile = load_profile("h100-pair")
    assert targets["vllm-reasoning"] == f"127.0.0.1:{profile.server('reasoning').port}"
    assert targets["vllm-coder"] == f"127.0.0.1:{profile.server('coder').port}"
    assert targets["tandem"] == "127.0.0.1:9464"  # the port the README's example uses
