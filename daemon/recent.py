"""The daemon's recent warnings and errors, kept for ``mlxd doctor``."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any


class RecentErrors(logging.Handler):
    """Keeps the last ``size`` records at WARNING or above."""

    def __init__(self, size: int = 50) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )
