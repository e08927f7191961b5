"""What goes wrong on the runner's side: finding a model's files
(``runner/sources.py``, ``runner/hub.py``), and a runner, as its client
(``runner/client.py``) says.

The runner is a leaf: it knows nothing of the scheduler or of HTTP. The
layers above turn these into the errors clients see (``scheduler/errors.py``:
``ModelLoadFailed`` and ``RunnerCrashed``).
"""

from __future__ import annotations


class RunnerError(RuntimeError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LoadFailed(RunnerError):
    """The runner could not load its model."""


class RunnerGone(RunnerError):
    """The runner exited, or failed a step: the requests on it fail."""


class BadInput(ValueError):
    """A request's own input cannot be used (an image that does not decode):
    the runner fails it as the sender's error."""


class Refused(RunnerError):
    """The runner failed the request for its own input (``BadInput``)."""


class SourceError(RuntimeError):
    """A model's files cannot be found or prepared."""
