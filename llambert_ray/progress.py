"""One progress line per stage: `name  done/total rows  pct  rows/s  ETA`.

A stage counts its rows with `Progress.count(ds)`: a light Ray Data step that reports each batch, as it passes, to
a small counter actor; a thread in the driver polls it twice a second. On a terminal the line is redrawn in place;
in a file or a pipe (or with -v, when Ray's logs scroll by) a new line is printed every few seconds while it moves.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

from llambert_ray import console
from llambert_ray.console import lock, open_logs, verbose
from llambert_ray.ray_env import LIGHT_CPUS

log = logging.getLogger(__name__)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_counter_handle: Any = None
_counter_session: str | None = None


def _counter():
    """One small counter actor per Ray session (no CPU): stages add the rows they finish, keyed by stage."""
    global _counter_handle, _counter_session
    import ray

    session = ray.get_runtime_context().gcs_address + ray.get_runtime_context().get_job_id()
    if _counter_handle is None or _counter_session != session:

        @ray.remote(num_cpus=0, max_restarts=0)
        class RowCounter:
            def __init__(self):
                self.counts: dict[str, int] = {}

            def add(self, key: str, n: int) -> None:
                self.counts[key] = self.counts.get(key, 0) + n

            def get(self, key: str) -> int:
                return self.counts.get(key, 0)

            def drop(self, key: str) -> None:
                self.counts.pop(key, None)

        _counter_handle = RowCounter.remote()
        _counter_session = session
    return _counter_handle


class _Tally:
    """Counts rows as they pass, a batch at a time, and leaves them as they are: a Ray Data step (`count`), or
    called by a training loop (`tally`)."""

    def __init__(self, counter, key: str):
        self.counter, self.key = counter, key

    def __call__(self, batch):
        self.counter.add.remote(self.key, len(batch))
        return batch


class Progress:
    """One stage's progress line: `name  done/total unit  pct  rate  ETA`.

    On a terminal it is one line redrawn in place (at most twice a second); otherwise (a file, a pipe, `-v`) a new
    line when the count moved and at least `interval` seconds passed (5 s, growing to 30 s in long stages), or
    every 60 s while nothing moves. `close()` prints the final line with the stage's mean rate.
    """

    _seq = 0

    def __init__(self, name: str, total: int | None, *, unit: str = "rows", done: int = 0,
                 stream: TextIO | None = None, interval: float | None = None, live: bool | None = None):
        self.name, self.total, self.unit = name, total, unit
        self.base = self.done = done
        self.stream = stream or sys.stderr
        self.live = live if live is not None else (_isatty(self.stream) and not verbose())
        self.interval = interval
        self.t0 = time.time()
        self._first: tuple[float, int] | None = None  # (time, count) when the first rows arrived
        self._last_print = self.t0
        self._last_printed_done: int | None = None
        self._line = ""
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._counter = None
        Progress._seq += 1
        self.key = f"{name}-{os.getpid()}-{Progress._seq}-{self.t0}"

    # ---------------------------------------------------------------- counting
    def count(self, ds, num_cpus: float = LIGHT_CPUS):
        """`ds` with a step that reports its rows to this line as they pass (no-op when Ray is not running).
        `num_cpus`: the step's upstream map's (the light steps' by default), so Ray Data fuses the two into one
        task."""
        counter = self._ensure_counter()
        if counter is None:
            return ds
        # batch_format None: each block as it is (no conversion); batch_size None: a whole block per call
        return ds.map_batches(_Tally(counter, self.key), batch_format=None, batch_size=None, num_cpus=num_cpus,
                              zero_copy_batch=True)

    def tally(self):
        """A picklable callable that adds len(batch) to this line, for code outside Ray Data (a Ray Train loop);
        None when Ray is not running."""
        counter = self._ensure_counter()
        return _Tally(counter, self.key) if counter is not None else None

    def _ensure_counter(self):
        if self._counter is None:
            try:
                import ray

                if ray.is_initialized():
                    self._counter = _counter()
            except Exception as e:  # progress is a nicety: never fail a stage over it
                log.info("progress counter unavailable: %s", e)
        return self._counter

    def rebase(self, done: int) -> None:
        """Start counting afresh from `done` (a stage's next attempt at the rows an earlier one left)."""
        with lock:
            Progress._seq += 1
            self.key = f"{self.name}-{os.getpid()}-{Progress._seq}-{time.time()}"
            self.base = self.done = done

    def update(self, done: int) -> None:
        """Set the count (rows finished so far, including `done` given at the start)."""
        with lock:
            if done > self.done and self._first is None:
                self._first = (time.time(), done)  # the rate counts from the first rows on (not the start-up)
            self.done = done
            self._show()

    # ---------------------------------------------------------------- drawing
    def _text(self, final: bool = False) -> str:
        now = time.time()
        elapsed = now - self.t0
        total = f"/{self.total}" if self.total is not None else ""
        # a redone attempt (a training worker restarted) can count rows twice: never show more than the total
        shown = min(self.done, self.total) if self.total is not None else self.done
        parts = [f"{self.name}", f"{shown}{total} {self.unit}"]
        if self.total:
            parts.append(f"{min(self.done / self.total, 1.0):4.0%}")
        if final:
            new = self.done - self.base
            if new > 0 and elapsed > 0:
                parts.append(f"{new / elapsed:.1f} {self.unit}/s")
            parts.append(f"in {_fmt_seconds(elapsed)}")
        elif self._first is None:
            parts.append(f"starting ({_fmt_seconds(elapsed)})")
        else:
            t1, n1 = self._first
            rate = (self.done - n1) / (now - t1) if now > t1 and self.done > n1 else 0.0
            if rate > 0:
                parts.append(f"{rate:.1f} {self.unit}/s")
                if self.total is not None:
                    parts.append(f"ETA {_fmt_seconds(max(self.total - self.done, 0) / rate)}")
            parts.append(f"{_fmt_seconds(elapsed)}")
        return "  ".join(parts)

    def _show(self) -> None:
        now = time.time()
        if self.live:
            if now - self._last_print >= 0.5 or not self._line:
                self._line = self._text()
                self._redraw()
                self._last_print = now
            return
        elapsed = now - self.t0
        every = self.interval if self.interval is not None else min(30.0, max(5.0, elapsed / 10))
        moved = self.done != self._last_printed_done
        if self.total is not None and self.done >= self.total:
            return  # all rows are in: the final line (close) says so, with the stage's rate
        if (moved and now - self._last_print >= every) or now - self._last_print >= 60:
            self.stream.write(self._text() + "\n")
            self.stream.flush()
            self._last_print, self._last_printed_done = now, self.done

    def _clear(self) -> None:
        if self.live and self._line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _redraw(self) -> None:
        if self.live and self._line:
            self.stream.write("\r\x1b[K" + self._line)
            self.stream.flush()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Progress:
        open_logs()  # a stage runs: the command was not refused, its log folder is made now
        with lock:
            if self.live:
                console.set_active(self)
            self._show()
        self._thread = threading.Thread(target=self._poll, name=f"progress-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            n = None
            if self._counter is not None:
                try:
                    import ray

                    n = ray.get(self._counter.get.remote(self.key), timeout=5)
                except Exception:
                    n = None
            with lock:
                if self._stop.is_set():
                    return
                if n is not None:
                    self.update(self.base + n)
                else:
                    self._show()

    def close(self, done: int | None = None, *, ok: bool = True) -> None:
        """Stop updating; print the final line (`done`: the stage's own final count, when it knows better). Once:
        a stage that closes its line with the exact count inside `with Progress(..)` leaves nothing for the exit.
        The poll thread stops first, so no tally read after `done` can overwrite it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with lock:
            if done is not None:
                self.done = done
            if ok:
                if self.live:
                    self.stream.write("\r\x1b[K" + self._text(final=True) + "\n")
                else:
                    self.stream.write(self._text(final=True) + "\n")
            elif self.live and self._line:
                self.stream.write("\n")  # keep the last state visible above the error
            self.stream.flush()
            if console.active() is self:
                console.set_active(None)
        if self._counter is not None:
            try:
                self._counter.drop.remote(self.key)
            except Exception:
                pass

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
