"""mlray's exception hierarchy.

Every error a user can cause is a subclass of :class:`MlrayError`. Each one carries the HTTP status it maps
to; the serving layer turns them into responses in exactly one place (``serving/http.render_error``).
"""

from __future__ import annotations


class MlrayError(Exception):
    """Base class of every error mlray raises on purpose."""

    status_code: int = 500


class ConfigError(MlrayError, ValueError):
    """A config file or flag holds a value mlray cannot use."""

    status_code = 400


class DataError(MlrayError, ValueError):
    """A dataset cannot be read or does not have the expected shape."""

    status_code = 400


class InvalidInput(MlrayError, ValueError):
    """A prediction request does not match the model's signature."""

    status_code = 422


class BadRequest(MlrayError, ValueError):
    """A request body that is not JSON, or not an object."""

    status_code = 400


class PayloadTooLarge(MlrayError, ValueError):
    """A request with more rows (or bytes) than the configured maximum."""

    status_code = 413


class UnsupportedMediaType(MlrayError, ValueError):
    """A request body in a content type or charset the route does not read."""

    status_code = 415


class MethodNotAllowed(MlrayError):
    """A route called with a method it does not answer; ``allow`` lists those it does."""

    status_code = 405

    def __init__(self, message: str, *, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow


class NotFound(MlrayError, LookupError):
    """A model, version or alias that does not exist."""

    status_code = 404


class ModelLoadError(MlrayError):
    """A registered model whose files are missing, corrupt or do not match their recorded hash."""

    status_code = 503


class PromotionRefused(MlrayError):
    """The promotion gate refused to move an alias to a candidate version."""

    status_code = 409


class CompressionRefused(MlrayError):
    """A compressed variant lost more than the tolerance allows, or its method does not apply to the model;
    nothing is registered."""

    status_code = 409


class TrainingFailed(MlrayError, RuntimeError):
    """Distributed training ended in error; the MLflow run is marked FAILED and nothing is registered."""


class Unauthorized(MlrayError):
    """A protected route called without an API key."""

    status_code = 401


class Forbidden(MlrayError):
    """A protected route called with a key that is not valid, or a role that may not do this."""

    status_code = 403


class Overloaded(MlrayError):
    """The server is at capacity; the client should retry after ``retry_after_s``."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(MlrayError):
    """A request waited or ran past its deadline."""

    status_code = 504
    retry_after_s = 1
