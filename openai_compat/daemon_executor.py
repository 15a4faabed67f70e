"""An executor of one daemon thread, for the server's tokenizer work.

`ThreadPoolExecutor`'s workers are joined when the interpreter exits, so a long tokenization
still running when the server is told to stop (SIGTERM) would keep the process alive until it
ends. This executor's thread is a daemon: the process exits when the server is done, whatever
the thread is in the middle of. Calls run one at a time, in the order they were submitted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_STOP = object()


class DaemonThreadExecutor(Executor):
    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            future: Future[Any] = Future()
            self._queue.put((future, fn, args, kwargs))
            return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            result = None
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller, as ThreadPoolExecutor does
                future.set_exception(e)
            else:
                future.set_result(result)
            del item, future, fn, args, kwargs, result  # an idle thread keeps no request's data alive

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    pending = []
                    while True:
                        try:
                            pending.append(self._queue.get_nowait())
                        except queue.Empty:
                            break
                    for future, *_ in pending:
                        future.cancel()
                self._queue.put(_STOP)
        if wait:
            self._thread.join()
