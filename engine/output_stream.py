"""`OutputStream`: one request's outputs as the engine loop hands them over, for one consumer.

`AsyncEngine.add_request` takes a sink, a callable that the engine loop calls with each step's
delta `RequestOutput` of the request, then nothing after its finished output or an error
(`EngineDeadError`). `OutputStream.put` is such a sink. The stream keeps what comes for a
consumer that awaits the outputs one by one (`get`), or passes each on as it comes to a
consumer that takes them in a call (`forward_to`: a streaming response writes its events then,
with no task woken per token).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from engine.outputs import RequestOutput, merge_into

OutputItem = RequestOutput | BaseException  # a delta output, or the error that ends the request
Sink = Callable[[OutputItem], None]


class OutputStream:
    __slots__ = ("_forward", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[OutputItem] = deque()  # put, not taken yet
        self._waiter: asyncio.Future[None] | None = None  # a `get` waiting for the next item
        self._forward: Sink | None = None

    def put(self, item: OutputItem) -> None:
        """The sink: queue `item` (or pass it on, after `forward_to`)."""
        if self._forward is not None:
            self._forward(item)
            return
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        """The next output, with those queued behind it folded in (`merge_into`): a consumer
        that fell behind (a slow client, a busy event loop) catches up at once. Raises the error
        that ended the request, after the outputs that came before it."""
        items = self._items
        while not items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if isinstance(item, BaseException):
            raise item
        if not item.finished and items:
            following: list[RequestOutput] = []
            while items:
                nxt = items[0]
                if not isinstance(nxt, RequestOutput):
                    break  # the error: raised by the next `get`
                items.popleft()
                following.append(nxt)
                if nxt.finished:
                    break
            item = merge_into(item, following)
        return item

    def forward_to(self, sink: Sink) -> None:
        """From now on pass every item to `sink` as it comes; those queued go first, now, in
        order. `sink` must not block."""
        while self._items:
            sink(self._items.popleft())
        self._forward = sink
