"""Background work is not traced.

The service's loops (stats publishing, the invalidation listener, the change-stream monitor and
consumer) run outside any request: each Redis command or SQL statement they sent used to be a
trace of its own, without a parent (an idle 2-worker server exported 64 of them in 20 s),
burying the requests in the trace search. Their work is measured by the metrics and the stats
instead (the SQL hooks keep recording every statement; telemetry/README.md).

``finish`` stops such a loop: it lets it leave on its own for a moment, then cancels it.

``start_untraced`` starts a loop as a task whose context suppresses the instrumentations (the
OpenTelemetry ``suppress_instrumentation`` key; a task runs in a copy of the context it was
created in), and ``untraced()`` does the same for a block (a loop's clean-up on shutdown). A
request's own background work (a stale entry refreshed after the answer) is started from the
request and stays in its trace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry.instrumentation.utils import suppress_instrumentation

T = TypeVar("T")


def start_untraced(coroutine: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """``asyncio.create_task`` in a context where the instrumentations record nothing."""
    with suppress_instrumentation():
        return asyncio.create_task(coroutine, name=name)


@contextmanager
def untraced() -> Iterator[None]:
    """A block whose Redis commands and SQL statements the instrumentations do not trace."""
    with suppress_instrumentation():
        yield


async def finish(task: asyncio.Task[Any] | None, grace: float) -> None:
    """Wait up to ``grace`` seconds for a loop told to stop to leave on its own; then cancel it
    (as a last resort) and wait for it to go."""
    if task is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=grace)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
