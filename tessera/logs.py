"""structlog JSON logs on stderr. Secrets (keys, tokens) are never passed to a logger.

Errors a peer can cause at will (a flood of bad handshakes, a full disk hit by every request) go
through `Throttled`: the first occurrence is logged at once, repeats within the window are only
counted and reported in one line when the window ends, so an attacker cannot grow the log without
bound and an operator still sees that it is happening and how often.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import structlog


def setup(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str):
    return structlog.get_logger(name)


class Throttled:
    """At most one line per `key` per `window` seconds; the repeats are counted, not written.

    `log(key, event, **fields)` writes at once when the key was quiet for a window, otherwise it counts;
    the next line written for that key carries `suppressed=N`, the number of repeats it stood for.
    Keys are bounded (`max_keys`): past that the oldest are forgotten, so a peer varying its input
    cannot grow this table either.
    """

    def __init__(self, logger, window: float = 60.0, level: str = "warning", max_keys: int = 1024,
                 clock=time.monotonic):
        self._log = logger
        self._window = window
        self._level = level
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (last written at, repeats since)

    def log(self, key: str, event: str, **fields) -> bool:
        """Write or count one occurrence; True when a line was written."""
        now = self._clock()
        with self._lock:
            last, suppressed = self._state.get(key, (float("-inf"), 0))
            if now - last < self._window:
                self._state[key] = (last, suppressed + 1)
                return False
            if key not in self._state and len(self._state) >= self._max_keys:
                del self._state[next(iter(self._state))]
            self._state.pop(key, None)
            self._state[key] = (now, 0)  # re-inserted: the dict's order is oldest write first
        if suppressed:
            fields["suppressed"] = suppressed
        getattr(self._log, self._level)(event, **fields)
        return True
