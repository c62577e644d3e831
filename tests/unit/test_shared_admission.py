"""The shared admission's pure parts: URL redaction and constructor checks (no Redis)."""

from __future__ import annotations

import asyncio

import pytest

from routing.limits import FixedLimit
from routing.shared_admission import SharedAdmission, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@cache:6379/1", "redis://:***@cache:6379/1"),
        ("rediss://tandem:p%40ss@cache.internal/0", "rediss://tandem:***@cache.internal/0"),
        ("redis://user@cache:6379", "redis://user@cache:6379"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_acquire_before_start_is_a_clear_error() -> None:
    admission = SharedAdmission("coder@gpu0", FixedLimit(2), url="redis://127.0.0.1:1/0")

    async def acquire() -> None:
        await admission.acquire("s1")

    with pytest.raises(RuntimeError, match=r"coder@gpu0: start\(\) was not called"):
        asyncio.run(acquire())


def test_lease_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lease_ttl_s"):
        SharedAdmission("coder@gpu0", FixedLimit(2), url="redis://x", lease_ttl_s=0)


def test_before_start_the_surface_reads_the_local_limit() -> None:
    admission = SharedAdmission("coder@gpu0", FixedLimit(3), url="redis://x")
    assert (admission.limit, admission.in_flight, admission.queued) == (3, 0, 0)
    assert admission.stats()["degraded"] == 0
