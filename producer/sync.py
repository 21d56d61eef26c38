"""The blocking client, for code without an event loop (scripts, WSGI apps, notebooks).

    with SyncProducer.from_url("redis://localhost:6379") as p:
        result = p.wait(p.submit(model="smollm2-135m", prompt="Hello"), timeout_s=30)

It runs an async `Producer` on an event loop in a daemon thread of its own; every method
blocks until that loop has done the work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from agentfleet.producer.client import Producer
from agentfleet.schemas.wire import Result, Task

T = TypeVar("T")


class SyncProducer:
    def __init__(self, make: Any) -> None:
        """`make` is a zero-argument callable building the async Producer (run on our loop)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="agentfleet-producer")
        self._thread.start()

        async def build() -> Producer:
            return make()

        self._producer = self._run(build())

    @classmethod
    def from_url(cls, url: str | None = None, **kwargs: Any) -> SyncProducer:
        return cls(lambda: Producer.from_url(url, **kwargs))

    @property
    def id(self) -> str:
        return self._producer.id

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, task: Task | None = None, /, *, reply: bool = True, **fields: Any) -> str:
        return self._run(self._producer.submit(task, reply=reply, **fields))

    def submit_many(self, tasks: Iterable[Task], *, reply: bool = True) -> list[str]:
        return self._run(self._producer.submit_many(list(tasks), reply=reply))

    def wait(self, task_id: str, timeout_s: float = 60.0) -> Result:
        return self._run(self._producer.wait(task_id, timeout_s))

    def wait_many(self, task_ids: Sequence[str], timeout_s: float = 60.0) -> list[Result]:
        return self._run(self._producer.wait_many(task_ids, timeout_s))

    def wait_chain(self, task_id: str, timeout_s: float = 60.0) -> list[Result]:
        return self._run(self._producer.wait_chain(task_id, timeout_s))

    def cancel(self, task_id: str, model: str) -> None:
        self._run(self._producer.cancel(task_id, model))

    def get_result(self, task_id: str, model: str | None = None) -> Result | None:
        return self._run(self._producer.get_result(task_id, model))

    def as_completed(self, task_ids: Iterable[str], timeout_s: float = 60.0) -> Iterator[Result]:
        agen = self._producer.as_completed(list(task_ids), timeout_s)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._producer.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
