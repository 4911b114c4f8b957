"""Server and per-app settings: read from a TOML file, or one keyless development app.

A config file names the model once and each app under ``[apps.NAME]``::

    model = "llava-hf/llava-1.5-7b-hf"
    store = "redis://cache:6379/0"

    [apps.support-bot]
    key_sha256 = "9f86d0..."   # guardrail serve --hash-key KEY prints it; keys are never stored
    alpha = 0.8
    max_concurrent = 8

A request's API key selects its app; nothing in a request can select another app's settings or
store namespace.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guardrail.backends.runtimes import Runtime
from guardrail.service import AppSpec


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which an API key is configured."""
    return hashlib.sha256(key.encode()).hexdigest()


class AppSettings(AppSpec):
    """One application: its guard settings (see :class:`~guardrail.service.AppSpec`; every
    ``GuardConfig`` field, nested under ``guard`` or flat), its key and its limits."""

    key_sha256: str | None = None  # None: development mode only
    max_concurrent: int = Field(default=4, ge=1)
    max_request_bytes: int = Field(default=20_000_000, ge=1)
    # generation stops after this long, and a response (streamed or not) ends by then
    max_request_s: float = Field(default=300.0, gt=0)

    def accepts(self, key: str) -> bool:
        """Whether ``key`` is this app's key (constant-time comparison of digests)."""
        return self.key_sha256 is not None and hmac.compare_digest(hash_key(key), self.key_sha256)


class ImageFetchSettings(BaseModel):
    """Where remote images may come from (see :class:`~adapters.remote_images.
    RemoteImageFetcher`): public addresses only, unless ``allow_networks`` opts an internal
    network back in; ``allow_hosts`` restricts to named hosts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_hosts: tuple[str, ...] | None = None
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = Field(default=10_000_000, ge=1)
    timeout_s: float = Field(default=5.0, gt=0)


class ServerSettings(BaseModel):
    """The served model and its apps. ``development``: one app named ``default`` without a
    key, served on loopback only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    family: str | None = None
    device: str | None = None
    dtype: str | None = None
    # the runtime: transformers, or a vLLM engine (engine_args go to vllm.LLM)
    backend: Runtime = "transformers"
    engine_args: dict[str, Any] = Field(default_factory=dict)
    store: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    apps: tuple[AppSettings, ...]
    development: bool = False
    docs: bool = False  # serve /docs, /redoc and /openapi.json (they need no key)
    images: ImageFetchSettings = ImageFetchSettings()
    # browser origins allowed to call the API (CORS); none by default
    cors_origins: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _checked(self) -> ServerSettings:
        names = [app.name for app in self.apps]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"apps must be named once each, got {names}")
        if self.store and "namespace=" in self.store:
            raise ValueError("the store URL names a namespace: each app has its own (namespace=)")
        if self.development:
            if self.host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError("development mode (no keys) serves on loopback only")
            return self
        keys = [app.key_sha256 for app in self.apps]
        if None in keys:
            raise ValueError("every app needs a key_sha256 (or run without a config file)")
        if len(set(keys)) != len(keys):
            raise ValueError("two apps share a key")
        return self

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: object) -> ServerSettings:
        """Read a config file (see the module docstring); ``overrides`` win over the file."""
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        apps = data.pop("apps", {})
        data["apps"] = [{"name": name, **values} for name, values in apps.items()]
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    @classmethod
    def development_mode(cls, model: str, **options: object) -> ServerSettings:
        """One app named ``default``, no keys, loopback only."""
        values = {k: v for k, v in options.items() if v is not None}
        data = {"model": model, "apps": [{"name": "default"}], "development": True, **values}
        return cls.model_validate(data)

    def app_for(self, key: str | None) -> AppSettings | None:
        """The app whose key this is (the development app for any key); None if no app."""
        if self.development:
            return self.apps[0]
        if not key:
            return None
        return next((app for app in self.apps if app.accepts(key)), None)
