"""One place for progress bars, so library code stays quiet when asked to."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


LOG_AFTER_S = 5.0  # off a terminal, loops that took longer say so in one line (logs of long runs)


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    if not enabled or not _main_rank():
        yield from items
        return
    if not Console().is_terminal:  # no bar can be drawn where the bar would go
        start, n = time.perf_counter(), 0
        for item in items:
            yield item
            n += 1
        if time.perf_counter() - start >= LOG_AFTER_S:
            Console(stderr=True).print(
                f"{description}: {n} done in {time.perf_counter() - start:.1f} s", highlight=False
            )
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)


def _main_rank() -> bool:
    """Under torchrun only rank 0 draws progress."""
    from .distributed import world

    return world().main
