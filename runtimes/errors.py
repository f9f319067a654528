"""The one exception hierarchy every user-facing failure in edgekit raises.

Each message names the thing, the bad value and the fix. The CLI prints ``str(err)`` and exits with
``err.exit_code``; no traceback reaches the user.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgekitError(Exception):
    """Base class of every error edgekit raises on purpose. ``exit_code`` is the CLI's; ``http_status`` and
    ``code`` are what ``edgekit serve`` answers with (the OpenAI error body's ``code``)."""

    exit_code: int = 2
    http_status: int = 500
    code: str = "internal_error"


class ConfigError(EdgekitError, ValueError):
    """An option or argument has a bad value (sampling settings, prompt length, CLI flags)."""

    http_status = 400
    code = "invalid_value"


class SourceError(EdgekitError):
    """A model source cannot be found or read."""


class UnsupportedModelError(EdgekitError):
    """The model's architecture or a feature of it is not supported."""


class BundleError(EdgekitError):
    """A bundle is missing, partial, tampered with, or of an unknown format version."""


class OnnxruntimeVersionError(BundleError):
    """The bundle's graphs need a newer onnxruntime than the one running."""


class ExportError(EdgekitError):
    """Export failed for a reason that is not the user's input (or the output location is taken)."""


class ParityError(EdgekitError):
    """A parity report has misses; ``report`` holds the full report."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class ContextLengthError(ConfigError):
    """Prompt plus requested new tokens do not fit the bundle's context."""

    code = "context_length_exceeded"


class UnsupportedOptionError(ConfigError):
    """An option this model does not take (e.g. a diffusion setting on an AR bundle)."""

    code = "unsupported_parameter"


class QueueFullError(EdgekitError):
    """The engine's waiting queue is full; retry later."""

    http_status = 429
    code = "rate_limit_exceeded"


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for a near miss, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if value.lower() in c.lower() or c.lower() in value.lower()][:1]
    return f" Did you mean '{close[0]}'?" if close else ""
