"""An OpenAI-compatible HTTP front end for the guarded model (``guardrail serve``)."""

from adapters.server.app import create_app
from adapters.server.settings import AppSettings, ServerSettings, hash_key

__all__ = ["AppSettings", "ServerSettings", "create_app", "hash_key"]
