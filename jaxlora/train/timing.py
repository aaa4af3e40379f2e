"""Where a run's wall time goes: compile / step / eval / generation / data / checkpoint / export.

Why this file exists: users feel the whole `jaxlora train`, not the steady-state step, and on a
short run XLA compilation (one program per distinct batch shape, plus eval and generation
programs) can cost more than the training itself. `RunClock` splits the wall time into disjoint
phases so the breakdown adds up:

- compile time comes from JAX's own monitoring events (`/jax/core/compile/backend_compile_duration`
  and `.../jaxpr_to_mlir_module_duration`: XLA compilation, or a persistent-cache load, and
  lowering), wherever in the run it happens;
- each `phase(name)` block's wall time is recorded MINUS the compile time spent inside it, so a
  phase is the work itself and `compile_s + sum(phases) <= wall_s`; what no phase covers
  (Python between phases, logging) is `other_s`.

Tracing (Python running the model function to build a jaxpr) is left inside the phase that
triggered it: JAX reports it per nested `jit`, so summing its events would count time twice.

Counts are deterministic (tests assert them, not times): `compile/count` = XLA programs built
(a persistent-cache hit is counted, and again as `compile/cache_hits`), `compile/traces` = jaxprs
traced (nested jits included), and per program `compile/train_step`, `compile/eval_step`,
`compile/decode_batch` (sample generations): one per distinct batch shape when all is well.

Dispatch is asynchronous: a step's device time lands in the phase that first waits for it. The
loop therefore waits for the train state inside the `step` phase before an eval or checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import jax

PHASES = ("setup", "data", "compile", "step", "eval", "generation", "checkpoint", "export")
KEY_PROGRAMS = ("train_step", "eval_step", "decode_batch")  # jitted function names
_COMPILE_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
_COMPILE_COUNT_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_active: list[RunClock] = []  # clocks currently recording (listeners are process-global)
_lock = threading.Lock()
_registered = False


def _on_duration(event: str, seconds: float, fun_name: str = "", **_: object) -> None:
    if event in _COMPILE_EVENTS or event == _TRACE_EVENT:
        for clock in list(_active):
            clock._event(event, seconds, str(fun_name))


def _on_event(event: str, **_: object) -> None:
    if event == _CACHE_HIT_EVENT:
        for clock in list(_active):
            clock.cache_hits += 1


def _register() -> None:
    # jax.monitoring has no public "unregister": one pair of listeners for the process,
    # forwarding to whichever clocks are running.
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _registered = True


class RunClock:
    """Disjoint wall-time phases of one run plus JAX compile time and counts."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.compile_s = 0.0
        self.compiles = 0
        self.traces = 0
        self.cache_hits = 0
        self.compiles_by_name: dict[str, int] = {}  # jit(fun_name) -> XLA programs built
        self._t0: float | None = None
        self._t1: float | None = None

    def _event(self, event: str, seconds: float, fun_name: str) -> None:
        if event == _TRACE_EVENT:
            self.traces += 1
            return
        self.compile_s += seconds
        if event == _COMPILE_COUNT_EVENT:
            self.compiles += 1
            name = fun_name.removeprefix("jit(").removesuffix(")")
            self.compiles_by_name[name] = self.compiles_by_name.get(name, 0) + 1

    def start(self) -> RunClock:
        _register()
        self._t0 = time.perf_counter()
        _active.append(self)
        return self

    def stop(self) -> None:
        if self in _active:
            _active.remove(self)
        self._t1 = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as `name`, less the compile time inside it (phases must not nest)."""
        t, c = time.perf_counter(), self.compile_s
        try:
            yield
        finally:
            spent = time.perf_counter() - t - (self.compile_s - c)
            self.phases[name] = self.phases.get(name, 0.0) + max(spent, 0.0)

    @property
    def wall_s(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._t1 or time.perf_counter()) - self._t0

    def breakdown(self) -> dict[str, float]:
        """`time/<phase>_s` for every phase (0 when unused), `time/other_s`, `time/wall_s`,
        and the compile counts — the record written to metrics.jsonl at the end of a run."""
        wall = self.wall_s
        out = {f"time/{p}_s": self.phases.get(p, 0.0) for p in PHASES if p != "compile"}
        out["time/compile_s"] = self.compile_s
        out["time/other_s"] = max(wall - sum(out.values()), 0.0)
        out["time/wall_s"] = wall
        out["compile/count"] = float(self.compiles)
        out["compile/traces"] = float(self.traces)
        out["compile/cache_hits"] = float(self.cache_hits)
        for name in KEY_PROGRAMS:  # the programs a run compiles once per batch shape
            out[f"compile/{name}"] = float(self.compiles_by_name.get(name, 0))
        return out

    def summary(self) -> str:
        """One line for the end of a run: the phases that took time, largest first."""
        b = self.breakdown()
        parts = [(k[5:-2], v) for k, v in b.items() if k.startswith("time/") and k != "time/wall_s"]
        parts = [f"{name} {v:.1f}s" for name, v in sorted(parts, key=lambda x: -x[1]) if v >= 0.05]
        return (
            f"time: {b['time/wall_s']:.1f}s = " + " + ".join(parts) + f" ({self.compiles} XLA "
            f"compiles, {self.cache_hits} from the persistent cache)"
        )
