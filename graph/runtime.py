"""Assembly from settings: endpoints (real or the built-in emulator), router, chat models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graph.settings import Settings
from nodes.llm import RoutedModels
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
    emulators: dict[str, Any] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Stop scrapers and emulator engines."""
        await self.router.aclose()
        for app in self.emulators.values():
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                await engine.aclose()


def emulated_endpoints(
    settings: Settings,
    *,
    reasoning_profile: str | None = None,
    coder_profile: str | None = None,
    seed: int | None = None,
) -> tuple[dict[Role, list[Replica]], dict[str, Any]]:
    """One in-process emulator per role, reached through a streaming in-process transport."""
    from serving.emulator.app import create_app
    from serving.emulator.transport import InProcessTransport

    profiles = {
        "reasoning": reasoning_profile or settings.emulator_reasoning_profile,
        "coder": coder_profile or settings.emulator_coder_profile,
    }
    models = {"reasoning": settings.reasoning_model, "coder": settings.coder_model}
    gpus = {"reasoning": "gpu0", "coder": "gpu1"}
    endpoints: dict[Role, list[Replica]] = {}
    apps: dict[str, Any] = {}
    for role in ("reasoning", "coder"):
        app = create_app(
            profiles[role],
            seed=settings.emulator_seed if seed is None else seed,
            served_model_name=models[role],
        )
        apps[role] = app
        endpoints[role] = [
            Replica(
                url=f"http://emulator-{role}.tandem.internal/v1",
                model=models[role],
                gpu=gpus[role],
                transport=InProcessTransport(app),
            )
        ]
    return endpoints, apps


def configured_endpoints(settings: Settings) -> dict[Role, list[Replica]]:
    """Endpoints from `TANDEM_ENDPOINTS_FILE`, or the two `TANDEM_*_URL` settings."""
    if settings.endpoints_file is not None:
        return load_endpoints_file(settings.endpoints_file)
    assert settings.reasoning_url and settings.coder_url
    return {
        "reasoning": [
            Replica(url=settings.reasoning_url, model=settings.reasoning_model, gpu="gpu0")
        ],
        "coder": [Replica(url=settings.coder_url, model=settings.coder_model, gpu="gpu1")],
    }


def build_runtime(
    settings: Settings,
    *,
    limit: str | None = None,
    order: str | None = None,
    endpoints: dict[Role, list[Replica]] | None = None,
    emulators: dict[str, Any] | None = None,
) -> Runtime:
    """Router + models for `settings` (the emulator when no endpoint is configured)."""
    apps: dict[str, Any] = dict(emulators or {})
    if endpoints is None:
        if settings.emulated:
            endpoints, apps = emulated_endpoints(settings)
        else:
            endpoints = configured_endpoints(settings)
    metrics = TandemMetrics()
    router = Router(
        endpoints,
        limit=limit or settings.limit,
        order=order or settings.order,
        metrics=metrics,
        request_timeout_s=settings.request_timeout_s,
    )
    models = RoutedModels(
        router=router,
        api_key=settings.api_key.get_secret_value(),
        timeout_s=settings.request_timeout_s,
    )
    return Runtime(settings=settings, router=router, models=models, metrics=metrics, emulators=apps)
