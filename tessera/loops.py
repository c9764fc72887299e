"""Handing results to asyncio event loops from other threads."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def call_on_loops(items: Iterable[T], loop_of: Callable[[T], asyncio.AbstractEventLoop],
                  fn: Callable[[list[T]], None]) -> None:
    """Call fn(group) on each item's loop, one call per loop (one wake-up however many items it gets).

    A closed loop is skipped: its coroutines, and so the items' waiters, are gone.
    """
    groups: dict[asyncio.AbstractEventLoop, list[T]] = {}
    for item in items:
        groups.setdefault(loop_of(item), []).append(item)
    for loop, group in groups.items():
        try:
            loop.call_soon_threadsafe(fn, group)
        except RuntimeError:
            pass
