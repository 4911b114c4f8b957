"""Scale-out on Ray Serve: the OpenAI-compatible app as the ingress, the model in replicas.

``guardrail serve --config serve.toml --replicas N`` starts a local Ray instance (or joins the
one ``RAY_ADDRESS`` names) and runs two deployments:

* ``GuardedModel`` - N replicas, each loading the model once for all apps in a guard service,
  whose scheduler batches every call in flight on that replica (streamed or not) continuously.
  Replicas share dataset-level shifts through the store (use Redis with several replicas).
* ``Ingress`` - the FastAPI app of :mod:`adapters.server.app` (keys, limits, metrics), calling
  the replicas through a deployment handle.

For a GPU cluster, give each replica its GPU and let Serve scale on load::

    application(settings, replicas=2, num_gpus=1, autoscaling={"min_replicas": 1,
                "max_replicas": 4, "target_ongoing_requests": 8})
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from adapters.server.app import create_app
from adapters.server.runners import LocalRunner, StreamPiece
from adapters.server.settings import ServerSettings
from guardrail import GuardedOutput
from guardrail.errors import GuardrailError, GuardUnavailableError
from guardrail.service import Call

MAX_ONGOING = 64  # calls in flight per replica: its scheduler batches them


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class GuardedModel:
    """One replica: the model's guard service with every app (its scheduler batches the calls
    in flight continuously; errors are returned as values, so that the typed error, with its
    decision, reaches the ingress as it was raised)."""

    def __init__(self, settings_json: str) -> None:
        self.runner = LocalRunner(ServerSettings.model_validate_json(settings_json))
        self.runner.load()

    async def invoke(self, call: Call) -> GuardedOutput | GuardrailError:
        try:
            return await self.runner.invoke(call)
        except GuardrailError as e:
            return e

    async def stream(self, call: Call) -> AsyncGenerator[StreamPiece | GuardrailError, None]:
        pieces = self.runner.stream(call)
        try:
            async for piece in pieces:
                yield piece
        except GuardrailError as e:
            yield e
        finally:
            await pieces.aclose()

    async def health(self) -> dict[str, str]:
        return await self.runner.health()


class RayRunner:
    """The ingress side: calls go to ``GuardedModel`` replicas through ``handle``."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self.handle = handle

    async def start(self) -> None:
        return None

    async def invoke(self, call: Call) -> GuardedOutput:
        answer = await self.handle.invoke.remote(call)
        if isinstance(answer, GuardrailError):
            raise answer
        assert isinstance(answer, GuardedOutput)
        return answer

    async def stream(self, call: Call) -> AsyncGenerator[StreamPiece, None]:
        pieces = self.handle.options(stream=True).stream.remote(call)
        assert isinstance(pieces, DeploymentResponseGenerator)
        try:
            async for piece in pieces:
                if isinstance(piece, GuardrailError):
                    raise piece
                yield piece
        finally:  # the consumer went away: cancel the replica's stream (it stops generating)
            pieces.cancel()  # type: ignore[no-untyped-call]

    async def health(self) -> dict[str, str]:
        states: dict[str, str] = await self.handle.health.remote()
        return states


def application(
    settings: ServerSettings,
    *,
    replicas: int = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    autoscaling: dict[str, Any] | None = None,
) -> serve.Application:
    """The Ray Serve application: ``Ingress`` over ``replicas`` model replicas (or an
    ``autoscaling`` config), each with ``num_gpus`` GPUs and ``num_cpus`` CPUs."""
    options: dict[str, Any] = {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus}}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    model = GuardedModel.options(**options).bind(settings.model_dump_json())  # type: ignore[attr-defined]
    api = create_app(settings, runner=_IngressRunner())

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, handle: DeploymentHandle[Any]) -> None:
            # this class travels by value (its globals are a copy): set the module's own
            from adapters.server import ray_serve

            ray_serve._INGRESS_RUNNER = RayRunner(handle)

    ingress: serve.Application = Ingress.bind(model)  # type: ignore[attr-defined]
    return ingress


# The ingress replica's runner: set by Ingress.__init__ in that replica's process.
_INGRESS_RUNNER: RayRunner | None = None


class _IngressRunner:
    """What the ingress app is built with: forwards to the replica's :class:`RayRunner` once
    it exists (until then the app answers 503)."""

    @staticmethod
    def _runner() -> RayRunner:
        if _INGRESS_RUNNER is None:
            raise GuardUnavailableError("the model replicas are not ready")
        return _INGRESS_RUNNER

    async def start(self) -> None:
        return None

    async def invoke(self, call: Call) -> GuardedOutput:
        return await self._runner().invoke(call)

    def stream(self, call: Call) -> AsyncGenerator[StreamPiece, None]:
        return self._runner().stream(call)

    async def health(self) -> dict[str, str]:
        return await self._runner().health() if _INGRESS_RUNNER is not None else {}
