"""Timeout and retry settings: checked at start, wired into the router and the models."""

from __future__ import annotations

import pytest

from graph.runtime import build_runtime
from graph.settings import Settings, SettingsError, load_settings
from routing.calls import Role
from routing.endpoints import Replica


def test_a_bound_longer_than_the_request_timeout_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="TANDEM_FIRST_TOKEN_TIMEOUT_S must not exceed"):
        load_settings(first_token_timeout_s=900, request_timeout_s=600)
    with pytest.raises(SettingsError, match="TANDEM_RETRIES"):
        load_settings(retries=-1)


def test_settings_reach_the_router_transport_and_the_retry_policy() -> None:
    settings = Settings(
        connect_timeout_s=1.5,
        first_token_timeout_s=7.0,
        stream_idle_timeout_s=9.0,
        retries=5,
        retry_base_s=0.25,
        retry_cap_s=4.0,
    )
    runtime = build_runtime(settings, endpoints=_network_endpoints())
    transport = runtime.router.client("coder")._transport
    assert (
        transport.connect_timeout_s,  # type: ignore[attr-defined]
        transport.first_token_timeout_s,  # type: ignore[attr-defined]
        transport.stream_idle_timeout_s,  # type: ignore[attr-defined]
    ) == (1.5, 7.0, 9.0)
    retry = runtime.models.call_retry
    assert (retry.retries, retry.base_s, retry.cap_s) == (5, 0.25, 4.0)
    model = runtime.models.for_role("coder")
    assert model.max_retries == 0  # type: ignore[attr-defined]
    assert model.call_retry is retry  # type: ignore[attr-defined]


def _network_endpoints() -> dict[Role, list[Replica]]:
    return {
        "reasoning": [Replica("http://gpu0:8001/v1", "r", "gpu0")],
        "coder": [Replica("http://gpu1:8002/v1", "c", "gpu1")],
    }


def test_in_process_emulators_get_no_hang_bounds() -> None:
    # They cannot hang, and on a virtual clock they stream in large coalesced events.
    transport = build_runtime(Settings()).router.client("coder")._transport
    assert transport.first_token_timeout_s is None  # type: ignore[attr-defined]
    assert transport.stream_idle_timeout_s is None  # type: ignore[attr-defined]
    assert transport.connect_timeout_s == 5.0  # type: ignore[attr-defined]
