"""Every error mlxd reports to a client, as one tree.

    MlxdError
    ├── InvalidRequest (ValueError)          the request itself is wrong
    │   ├── ContextLengthExceeded            prompt + max_tokens > the model's context
    │   ├── RequestTooLarge                  its KV cache could never fit the memory budget
    │   └── UnsupportedMediaType             a POST body that is not application/json
    ├── Unauthorized (PermissionError)       missing or wrong API key
    ├── Forbidden (PermissionError)          a Host or Origin mlxd does not serve
    ├── ModelNotFound (LookupError)          no configured model by that name
    ├── ResponseNotFound (LookupError)       no stored response (or item) by that id
    ├── ModelLoadFailed (RuntimeError)       the runner could not load the model
    ├── RunnerCrashed (RuntimeError)         the runner died while serving the request
    ├── Overloaded (RuntimeError)            no room for the request now
    │   ├── QueueFull                        the model's queue is at its limit
    │   ├── QueueTimeout                     waited past the model's queue timeout
    │   └── ModelTooLarge (MemoryError)      the model cannot fit the memory budget
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


class RequestTooLarge(InvalidRequest):
    pass


class UnsupportedMediaType(InvalidRequest):
    pass


class Unauthorized(MlxdError, PermissionError):
    pass


class Forbidden(MlxdError, PermissionError):
    pass


class ModelNotFound(MlxdError, LookupError):
    pass


class ResponseNotFound(MlxdError, LookupError):
    pass


class ModelLoadFailed(MlxdError, RuntimeError):
    pass


class RunnerCrashed(MlxdError, RuntimeError):
    pass


class Overloaded(MlxdError, RuntimeError):
    pass


class QueueFull(Overloaded):
    retry_after_s = 1  # the policy sets each one's from the queue ahead


class QueueTimeout(Overloaded):
    pass


class ModelTooLarge(Overloaded, MemoryError):
    pass


class ShuttingDown(MlxdError, RuntimeError):
    pass
