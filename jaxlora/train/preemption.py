"""SIGTERM / SIGINT handling: finish the current step, checkpoint, exit resumable.

Cloud TPU/GPU preemption sends SIGTERM with a grace period. The guard records the signal; the
training loop polls `should_stop()` after each optimiser step, writes a checkpoint and exits with
`EXIT_PREEMPTED`. On multi-host runs every process must stop at the same step, so the flag is
agreed across processes (any process signalled -> all stop) at optimiser-step boundaries.
A second Ctrl-C falls through to Python's default handler (immediate KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading


class PreemptionGuard:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self.received: int | None = None

    def _handler(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def should_stop(self) -> bool:
        from jaxlora.parallel import distributed

        return distributed.agree_on_flag(self._event.is_set())
