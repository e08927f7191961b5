"""Every error mlxd reports to a client, as one tree.

    MlxdError
    ├── InvalidRequest (ValueError)          the request itself is wrong
    │   └── ContextLengthExceeded            prompt + max_tokens > the model's context
    ├── Unauthorized (PermissionError)       missing or wrong API key
    ├── ModelNotFound (LookupError)          no configured model by that name
    ├── ModelLoadFailed (RuntimeError)       the runner could not load the model
    ├── RunnerCrashed (RuntimeError)         the runner died while serving the request
    └── ShuttingDown (RuntimeError)          the daemon is stopping

``api/errors.py`` is the one place these become HTTP responses.
"""

from __future__ import annotations


class MlxdError(Exception):
    """Base of every error reported to a client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(MlxdError, ValueError):
    pass


class ContextLengthExceeded(InvalidRequest):
    pass


class Unauthorized(MlxdError, PermissionError):
    pass


class ModelNotFound(MlxdError, LookupError):
    pass


class ModelLoadFailed(MlxdError, RuntimeError):
    pass


class RunnerCrashed(MlxdError, RuntimeError):
    pass


class ShuttingDown(MlxdError, RuntimeError):
    pass
