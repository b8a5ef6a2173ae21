"""Ray Serve deployment: the same FastAPI app, batcher and settings per replica, replicas anywhere on a Ray cluster.

Each replica loads the checkpoint and builds `create_app(settings)` itself (`__serve_build_asgi_app__`); the app's
lifespan starts its own worker exactly as in the single-process server: same routes, errors, limits and rewards.
Ray's proxy spreads requests over replicas; `ray_max_ongoing_requests` is high so that a replica's batcher sees a
whole storm of small requests (Ray's default of 5 would starve it), and a replica's own queue limit still answers 429.

Entry points: `reward-server serve --ray` (settings from `REWARD_*` as usual), or a Serve config file / `serve run`
with `import_path: app.server.ray_serve:build` and the settings overrides as `args`.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.server.main import create_app
from app.server.startup import load_model
from app.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "reward-server"


@serve.ingress()
class RewardReplica:
    """One replica: a whole reward server (model + batcher) behind Ray's HTTP proxy."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)  # resolved once by `build`: every replica runs the same configuration
        if self.settings.num_threads is None:  # torch would take every core of the node, not the replica's share
            threads = max(1, int(self.settings.ray_num_cpus))
            self.settings = self.settings.model_copy(update={"num_threads": threads})

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Loaded here, not in the app's lifespan: a broken checkpoint's own error (CheckpointError naming the file)
        # then reaches the deployment status, where Ray would only say that the ASGI lifespan failed.
        model = load_model(self.settings) if self.settings.models_file is None else None  # a file: each replica all
        app = create_app(self.settings, model=model, wait=True)
        app.state.replicated = True  # the admin API would change this replica alone: refused (redeploy instead)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def check_health(self) -> None:
        """Ray restarts a replica whose model workers stopped serving (those it serves: one the admin API is still
        loading is not yet counted)."""
        registry = getattr(self.app.state, "registry", None)  # type: ignore[attr-defined]
        workers = registry.workers if registry is not None else []
        if not workers or not all(w.ready for w in workers):
            failure = "; ".join(w.failure for w in workers if w.failure)
            raise RuntimeError(f"a model worker is not serving{f': its thread died ({failure})' if failure else ''}")


class ReplicaHeader:
    """`X-Replica` on every response: which replica answered, for operators (and the spread test)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (b"x-replica", replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_tagged if scope["type"] == "http" else send)


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve options from our settings: replica count or autoscaling bounds, resources per replica."""
    options: dict[str, Any] = {
        "name": APP_NAME,
        "ray_actor_options": {"num_cpus": settings.ray_num_cpus, "num_gpus": settings.ray_num_gpus},
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "max_constructor_retry_count": 1,  # a broken checkpoint fails the deployment at once, not after 20 tries
        # a stopping replica finishes what it admitted, whatever deadline a request asked for
        "graceful_shutdown_timeout_s": settings.max_request_timeout_s,
    }
    if settings.ray_max_replicas is None:
        options["num_replicas"] = settings.ray_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        }
    return options


def build(args: dict[str, Any] | None = None) -> Application:
    """Application builder (`serve run app.server.ray_serve:build model_path=...`, or a Serve config's `import_path`):
    `args` override settings by field name over the `REWARD_*` environment where the builder runs."""
    settings = Settings(**(args or {}))  # validated here: bad settings never reach a replica
    if settings.model_path.exists():  # replicas do not share the builder's working directory
        settings = settings.model_copy(update={"model_path": settings.model_path.resolve()})
    deployment = serve.deployment(RewardReplica).options(**deployment_options(settings))
    return deployment.bind(settings.model_dump(mode="json"))


def replica_error() -> str:
    """The last error line of the deployment's status message (a replica's traceback), e.g. the CheckpointError."""
    status = serve.status().applications.get(APP_NAME)
    messages = [d.message for d in status.deployments.values()] if status else []
    lines = [line.strip() for m in messages for line in m.splitlines() if "Error" in line]
    return lines[-1] if lines else ""


def run(settings: Settings) -> int:
    """`reward-server serve --ray`: deploy on Ray (joining `ray_address`, else a local cluster) and serve until
    SIGINT/SIGTERM, then drain: our application only on a shared cluster, the whole of Serve on our own."""
    import ray

    if settings.ray_address is None:  # a local cluster, on loopback, without the dashboard's cycles
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(build(settings.model_dump(mode="json")), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # Ray's message says only that the deployment failed: name why
            raise SystemExit(f"reward-server serve --ray: {exc} {replica_error()}") from None
        log.info("serving %s on Ray at http://%s:%d", settings.model_path, settings.host, settings.port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        return 0
    finally:
        if settings.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
