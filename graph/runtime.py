"""Assembly from settings: endpoints (real or the built-in emulator), router, chat models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from graph.settings import Settings
from nodes.llm import CallRetry, RoutedModels, Sampling
from routing.calls import Role
from routing.endpoints import Replica, load_endpoints_file
from routing.exporter import TandemMetrics
from routing.router import Router


@dataclass
class Runtime:
    """What a process needs to run sessions: the router, the models, and any emulators."""

    settings: Settings
    router: Router
    models: RoutedModels
    metrics: TandemMetrics
    emulators: dict[Role, Any] = field(default_factory=dict)

    async def preflight(self) -> list[str]:
        """What stops a run before it starts: each replica that does not serve its model.

        One line per problem, naming the role and URL (see `Router.preflight`); the API key
        is sent and never shown.
        """
        return await self.router.preflight(api_key=self.settings.api_key.get_secret_value())

    async def aclose(self) -> None:
        """Stop scrapers and emulator engines."""
        await self.router.aclose()
        for app in self.emulators.values():
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                await engine.aclose()


# Which GPU each role runs on, in the seed's two-card layout (labels only).
GPU_OF: dict[Role, str] = {"reasoning": "gpu0", "coder": "gpu1"}


def emulator_apps(
    profiles: Mapping[Role, Any],
    models: Mapping[Role, str],
    seed: int,
    *,
    engine_priority: bool = False,
) -> dict[Role, Any]:
    """One emulated vLLM server (an ASGI app with its engine) per role.

    `profiles` maps each role to a profile name, a profile file path or a `Profile`;
    `engine_priority` starts them with vLLM's `--scheduling-policy priority`.
    """
    from serving.emulator.app import create_app
    from serving.emulator.engine import SchedulingPolicy

    policy: SchedulingPolicy = "priority" if engine_priority else "fcfs"
    return {
        role: create_app(
            profiles[role], seed=seed, served_model_name=models[role], scheduling_policy=policy
        )
        for role in GPU_OF
    }


def in_process_endpoints(
    apps: Mapping[Role, Any], models: Mapping[Role, str]
) -> dict[Role, list[Replica]]:
    """Endpoints that reach `apps` through a streaming in-process transport (no sockets).

    A replica sends vLLM's per-request `priority` when its app runs the priority policy.
    """
    from serving.emulator.transport import InProcessTransport

    return {
        role: [
            Replica(
                url=f"http://emulator-{role}.tandem.internal/v1",
                model=models[role],
                gpu=GPU_OF[role],
                transport=InProcessTransport(app),
                priority=app.state.engine.scheduling_policy == "priority",
            )
        ]
        for role, app in apps.items()
    }


def emulated_endpoints(settings: Settings) -> tuple[dict[Role, list[Replica]], dict[Role, Any]]:
    """The built-in emulator for both roles, from the `TANDEM_EMULATOR_*` settings."""
    profiles: dict[Role, str] = {
        "reasoning": settings.emulator_reasoning_profile,
        "coder": settings.emulator_coder_profile,
    }
    models: dict[Role, str] = {
        "reasoning": settings.reasoning_model,
        "coder": settings.coder_model,
    }
    # Under the LAS order the built-in emulator serves by the rank the router sends.
    apps = emulator_apps(
        profiles, models, settings.emulator_seed, engine_priority=settings.order == "las"
    )
    return in_process_endpoints(apps, models), apps


def configured_endpoints(settings: Settings) -> dict[Role, list[Replica]]:
    """Endpoints from `TANDEM_ENDPOINTS_FILE`, or the two `TANDEM_*_URL` settings."""
    if settings.endpoints_file is not None:
        return load_endpoints_file(settings.endpoints_file)
    assert settings.reasoning_url and settings.coder_url
    return {
        "reasoning": [
            Replica(
                url=settings.reasoning_url,
                model=settings.reasoning_model,
                gpu=GPU_OF["reasoning"],
                priority=settings.engine_priority,
            )
        ],
        "coder": [
            Replica(
                url=settings.coder_url,
                model=settings.coder_model,
                gpu=GPU_OF["coder"],
                priority=settings.engine_priority,
            )
        ],
    }


def build_runtime(
    settings: Settings,
    *,
    limit: str | None = None,
    order: str | None = None,
    endpoints: dict[Role, list[Replica]] | None = None,
    metrics: TandemMetrics | None = None,
    retry_jitter: Callable[[], float] | None = None,
) -> Runtime:
    """Router + models for `settings` (the emulator when no endpoint is configured).

    Args:
        settings: The configuration; `limit`, `order` and `endpoints` override its own.
        limit: The router's limit policy string.
        order: The router's admission order.
        endpoints: Replicas per role (the caller then runs any servers behind them).
        metrics: Where the router exports its series (one exporter may serve several runs).
        retry_jitter: The uniform draw in [0, 1) that spreads retry back-offs (default: the
            process's random source; a benchmark passes a seeded one, so that a run on the
            virtual clock repeats exactly).
    """
    apps: dict[Role, Any] = {}
    if endpoints is None:
        if settings.emulated:
            endpoints, apps = emulated_endpoints(settings)
        else:
            endpoints = configured_endpoints(settings)
    metrics = metrics or TandemMetrics()
    # In-process emulators cannot hang or drop a connection, and on a virtual clock they
    # stream in large coalesced events: first-token and idle bounds would only cut healthy
    # calls there.
    in_process = all(r.transport is not None for replicas in endpoints.values() for r in replicas)
    router = Router(
        endpoints,
        limit=limit or settings.limit,
        order=order or settings.order,
        metrics=metrics,
        request_timeout_s=settings.request_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        first_token_timeout_s=None if in_process else settings.first_token_timeout_s,
        stream_idle_timeout_s=None if in_process else settings.stream_idle_timeout_s,
        admission_url=(
            settings.admission_url.get_secret_value() if settings.admission_url else None
        ),
    )
    call_retry = CallRetry(
        retries=settings.retries, base_s=settings.retry_base_s, cap_s=settings.retry_cap_s
    )
    if retry_jitter is not None:
        call_retry = replace(call_retry, random=retry_jitter)
    models = RoutedModels(
        router=router,
        api_key=settings.api_key.get_secret_value(),
        timeout_s=settings.request_timeout_s,
        sampling={
            "reasoning": Sampling(settings.reasoning_temperature, settings.reasoning_top_p),
            "coder": Sampling(settings.coder_temperature, settings.coder_top_p),
        },
        call_retry=call_retry,
    )
    return Runtime(settings=settings, router=router, models=models, metrics=metrics, emulators=apps)


# The server graph's runtime (`graph.graph.make_graph`), once its first run built it. It lives
# here, in a module imported by name: LangGraph Server loads graph/graph.py from its path as a
# module of another name, and its HTTP app (`graph/submission.py`) must find the same runtime.
_SERVER_RUNTIMES: list[Runtime] = []


def serve_runtime(runtime: Runtime) -> None:
    """Make `runtime` the server's: its `tandem_` metrics on the HTTP app and, when
    `TANDEM_METRICS_PORT` is set, on that port."""
    _SERVER_RUNTIMES.append(runtime)
    if runtime.settings.metrics_port is not None:
        runtime.metrics.serve(runtime.settings.metrics_port)


def server_metrics_page() -> bytes | None:
    """The server runtime's `tandem_` metrics in Prometheus text; None before its first run."""
    if not _SERVER_RUNTIMES:
        return None
    from prometheus_client import generate_latest

    return generate_latest(_SERVER_RUNTIMES[0].metrics.registry)
