"""Running a library call off the GUI thread and hearing from it on the GUI thread.

``denoise`` and ``finetune`` report to a ``progress`` callable and stop on a
``threading.Event``. A :class:`Job` runs such a call on a helper thread and
relays what it reports through a napari thread worker's ``yielded`` signal,
so every widget update happens on the GUI thread and the library stays free
of Qt. Reports are thinned to one per ``interval`` (except those ``keep``
marks, such as the end of an epoch), so a fast loop cannot flood the event
loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import thread_worker

_DONE = object()


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its return value, or the exception it raised.

    Errors are returned rather than raised so that the widget, not napari's
    generic traceback notification, tells the user what happened.
    """

    value: Any = None
    error: BaseException | None = None


class Job:
    """``task(report, stop)`` on a helper thread; reports arrive in ``on_report`` on the GUI thread.

    ``stop`` is the event handed to the library (``denoise(stop=...)``,
    ``finetune(stop=...)``); :meth:`stop` sets it. ``on_end`` receives the
    :class:`Outcome` once the task has returned.
    """

    def __init__(
        self,
        task: Callable[[Callable[[Any], None], threading.Event], Any],
        *,
        on_report: Callable[[Any], None],
        on_end: Callable[[Outcome], None],
        keep: Callable[[Any], bool] = lambda item: False,
        interval: float = 0.1,
    ):
        self._task = task
        self._keep = keep
        self._interval = interval
        self.stop_event = threading.Event()
        self._ended = threading.Event()
        self.worker = thread_worker(self._pump, start_thread=False)()
        self.worker.yielded.connect(on_report)
        self.worker.returned.connect(on_end)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Ask the library call to stop (within one batch or training step)."""
        self.stop_event.set()

    def wait(self, timeout: float) -> bool:
        """Wait until the library call has returned; True if it has."""
        return self._ended.wait(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop, silence the callbacks and wait for the call to return (closing a widget)."""
        self.stop()
        for signal in (self.worker.yielded, self.worker.returned):
            try:
                signal.disconnect()
            except (TypeError, RuntimeError):
                pass
        self.worker.quit()
        return self.wait(timeout)

    def _pump(self):
        reports: queue.SimpleQueue = queue.SimpleQueue()
        outcome: list[Outcome] = []

        def run() -> None:
            try:
                outcome.append(Outcome(value=self._task(reports.put, self.stop_event)))
            except BaseException as e:  # noqa: BLE001 - handed to the GUI thread
                outcome.append(Outcome(error=e))
            finally:
                self._ended.set()
                reports.put(_DONE)

        threading.Thread(target=run, name="napari-cnnt job", daemon=True).start()
        pending, last = None, 0.0
        while True:
            try:
                item = reports.get(timeout=self._interval)
            except queue.Empty:
                item = None
            if item is _DONE:
                break
            if item is not None and self._keep(item):
                if pending is not None:
                    yield pending
                pending = None
                yield item
                continue
            if item is not None:
                pending = item
            if pending is not None and time.monotonic() - last >= self._interval:
                yield pending
                pending, last = None, time.monotonic()
        if pending is not None:
            yield pending
        return outcome[0]
