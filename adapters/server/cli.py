"""``guardrail serve``: the OpenAI-compatible server (registered through an entry point, so that
the engine's CLI never imports a front end)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from adapters.server.settings import ServerSettings, hash_key
from guardrail.backends.runtimes import RUNTIMES
from guardrail.config_flags import add_guard_flags, guard_config

GRACEFUL_SHUTDOWN_S = 30


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` command to the ``guardrail`` parser."""
    p = commands.add_parser("serve", help="OpenAI-compatible server with per-app keys")
    p.add_argument("--config", help="TOML file naming the model and its apps")
    p.add_argument("--model", help="without --config: serve this model to one keyless app")
    p.add_argument("--family", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--backend", choices=RUNTIMES, default=None, help="the runtime (default transformers)"
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --backend vllm: an argument of vllm.LLM (tensor_parallel_size=2, ...), "
        "the value read as JSON when it parses",
    )
    p.add_argument("--store", default=None, help="shift store URL (default: embedded folder)")
    p.add_argument("--host", default=None, help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument("--replicas", type=int, default=0, help="run the model in N Ray Serve replicas")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (with --replicas)")
    p.add_argument("--hash-key", metavar="KEY", help="print the key_sha256 of KEY and exit")
    p.add_argument(
        "--decision-log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING"],
        help="level of the guardrail.decisions log (JSON lines on stderr; unguarded multimodal "
        "decisions are WARNING, the others INFO)",
    )
    add_guard_flags(p)  # given flags override every app's guard config
    p.set_defaults(func=serve)


def _engine_args(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs, each value JSON when it parses (numbers, booleans), else text."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--engine-arg takes NAME=VALUE, got {pair!r}")
        try:
            parsed[name] = json.loads(value)
        except json.JSONDecodeError:
            parsed[name] = value
    return parsed


def serve(args: argparse.Namespace) -> int:
    if args.hash_key:
        print(hash_key(args.hash_key))
        return 0
    import uvicorn

    from adapters.server.app import create_app

    logging.getLogger("guardrail.decisions").setLevel(args.decision_log_level)
    options = dict(
        family=args.family,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        engine_args=_engine_args(args.engine_arg) or None,
        store=args.store,
        host=args.host,
        port=args.port,
    )
    if args.config:
        settings = ServerSettings.from_toml(args.config, **options)
    elif args.model:
        settings = ServerSettings.development_mode(args.model, **options)
        print(
            "development mode: one app 'default', no API keys, serving on "
            f"{settings.host}:{settings.port} only (give --config for keys and apps)",
            file=sys.stderr,
        )
    else:
        raise ValueError("guardrail serve needs --config FILE or --model NAME")
    apps = [
        app.model_copy(update={"guard": guard_config(args, app.guard)}) for app in settings.apps
    ]
    settings = settings.model_copy(update={"apps": tuple(apps)})
    if args.replicas:
        return _serve_on_ray(settings, args.replicas, args.num_gpus)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,  # in-flight requests finish on SIGTERM
        log_level="warning",
    )
    return 0


def _serve_on_ray(settings: ServerSettings, replicas: int, num_gpus: float) -> int:
    """Ray Serve: joins ``RAY_ADDRESS`` or starts a local Ray; runs until SIGTERM or SIGINT,
    then shuts Serve down (replicas finish their in-flight requests first)."""
    import signal

    import ray
    from ray import serve

    from adapters.server.ray_serve import application

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # received below, by sigwait
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, replicas=replicas, num_gpus=num_gpus), route_prefix="/")
    print(f"serving on {settings.host}:{settings.port} with {replicas} replica(s)", file=sys.stderr)
    signal.sigwait(stop_signals)
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()
    return 0
