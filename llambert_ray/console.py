"""What a person running `llambert` sees: one progress line per stage (llambert_ray.progress), the stages' own
summaries and llambert's warnings, one line each.

Everything Ray, vLLM and DeepSpeed print goes to the run's `logs/` folder instead (`-v` shows it live):
- `llambert.log`: this process's log records (Ray, Ray Data, Ray Train, llambert) at INFO and up;
- `workers.log`: the stdout / stderr of every Ray worker of this run (vLLM engine, DeepSpeed, Ray Train), gathered
  from Ray's session folder when the process exits (local Ray, or a driver on the head node);
- `ray-session`: a link to Ray's own session log folder (raylet, GCS, per-worker core logs), live during the run.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

VERBOSE_ENV = "LLAMBERT_VERBOSE"
LOG_FILE = "llambert.log"
WORKERS_FILE = "workers.log"
# Loggers whose records go to llambert.log. "ray" and "ray.data" do not propagate to the root logger.
_FILE_LOGGERS = ("", "ray", "ray.data")
log = logging.getLogger(__name__)


def verbose() -> bool:
    """True when `-v/--verbose` (or LLAMBERT_VERBOSE=1) asked for Ray's, vLLM's and DeepSpeed's logs live."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if on else "0"


# ------------------------------------------------------------------------------------------------ console lines
lock = threading.RLock()  # every console write (echo, progress lines) holds it
_active: Any = None  # the progress line now on the terminal (progress.Progress), cleared before anything else prints


def set_active(line: Any) -> None:
    """Register the progress line now drawn on the terminal (None: none); `echo` clears and redraws it."""
    global _active
    _active = line


def active() -> Any:
    return _active


def echo(message: str = "", *, err: bool = False) -> None:
    """Print one line (stdout, or stderr with err) without tearing an updating progress line."""
    stream = sys.stderr if err else sys.stdout
    with lock:
        if _active is not None:
            _active._clear()
        stream.write(message + "\n")
        stream.flush()
        if _active is not None:
            _active._redraw()


class _EchoHandler(logging.Handler):
    """llambert's own warnings on the console, through echo (so a progress line is not torn)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)
        except Exception:  # pragma: no cover - logging must never fail a run
            self.handleError(record)


def setup_console() -> None:
    """llambert's own warnings on the console, one line each (a command calls this first, before Ray starts)."""
    ours = logging.getLogger("llambert_ray")
    if not any(isinstance(h, _EchoHandler) for h in ours.handlers):
        ours.addHandler(_EchoHandler(logging.WARNING))
        ours.setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------ logs
class _RunLog(logging.Handler):
    """LOG_DIR/llambert.log, opened when the run's first stage starts (`open_logs`): until then records wait in
    memory, so a command refused for bad input leaves no folder behind (`discard_logs`)."""

    def __init__(self, log_dir: Path):
        super().__init__(logging.INFO)
        self.dir = log_dir
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.file: logging.FileHandler | None = None
        self.waiting: deque[logging.LogRecord] = deque(maxlen=20_000)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.waiting.append(record)
        else:
            self.file.emit(record)

    def open(self) -> None:
        with self.lock:
            if self.file is not None:
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(self.dir / LOG_FILE, encoding="utf-8")
            self.file.setFormatter(self.formatter)
            while self.waiting:
                self.file.emit(self.waiting.popleft())
        if _session is not None:
            link = self.dir / "ray-session"
            try:
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(_session[0], target_is_directory=True)
            except OSError:
                pass
            if self.dir not in _log_dirs:
                _log_dirs.append(self.dir)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


_run_log: _RunLog | None = None  # this command's; one at a time
_log_dirs: list[Path] = []  # folders that get workers.log when this process exits
_session: tuple[Path, str] | None = None  # (Ray's session log folder, this driver's job id), noted while Ray runs
_exit_hook = False


def configure_logs(log_dir: str | Path | None) -> None:
    """Send this process's log records to LOG_DIR/llambert.log and, unless verbose, keep Ray's INFO lines and Ray
    Data's warnings off the console. Call before `ray.init` (so its start-up lines are caught) and `ray_started`
    after it. Idempotent."""
    global _run_log
    setup_console()
    _route_ray_loggers()
    if not verbose():
        logging.captureWarnings(True)  # Python warnings (library deprecations) go to the file, not the console
    root = logging.getLogger()
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    if log_dir is None:
        return
    log_dir = Path(log_dir).resolve()
    if _run_log is not None and _run_log.dir == log_dir:
        return
    _close_run_log(keep=True)
    _run_log = _RunLog(log_dir)
    _attach_run_log()


def _attach_run_log() -> None:
    """(Again:) importing Ray Data replaces the handlers of the "ray.data" logger."""
    if _run_log is not None:
        for name in _FILE_LOGGERS:
            lg = logging.getLogger(name)
            if _run_log not in lg.handlers:
                lg.addHandler(_run_log)


def ray_started() -> None:
    """After `ray.init`: Ray (and Ray Data LLM, imported later) set up console handlers of their own; note Ray's
    session folder for the log links and workers.log."""
    global _exit_hook
    _route_ray_loggers()
    _attach_run_log()
    _note_session()
    if not _exit_hook:
        # atexit runs the last registered first: Ray registered its shutdown in ray.init, before this, so the
        # workers' files are gathered after the workers stopped and wrote their last lines.
        atexit.register(_at_exit)
        _exit_hook = True
    if _session is None:
        log.info("Ray runs elsewhere: its workers' logs stay on the cluster's nodes (`ray logs`, the dashboard)")


class _RayDataConsole(logging.Filter):
    """Unless verbose, Ray Data's console shows only the warning a user must act on: an operator that cannot get
    the resources it asks for (the run would wait forever). Its other warnings repeat every few seconds (memory per
    operator, slow tasks), and its errors reach the user as the exception the stage raises; all of it is in
    llambert.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or "Cluster resources are not enough" in record.getMessage()


def _route_ray_loggers() -> None:
    quiet = not verbose()
    for name in ("ray", "ray.data"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, (logging.FileHandler, _RunLog)):
                h.setLevel(logging.WARNING if quiet else logging.INFO)  # Ray's INFO lines: llambert.log only
                if name == "ray.data" and not any(isinstance(f, _RayDataConsole) for f in h.filters):
                    h.addFilter(_RayDataConsole())
    # Ray Data LLM gives each of its loggers a console handler of its own, unless "ray.llm" has one: route them
    # through "ray" instead (console as above, llambert.log at INFO).
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("ray.llm.") and isinstance(lg, logging.Logger) and not lg.propagate:
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:
                    lg.removeHandler(h)
            lg.propagate = True


def session_logs() -> Path | None:
    """Ray's session log folder when it is on this machine (None for a remote cluster)."""
    return _session[0] if _session is not None else None


def open_logs() -> Path | None:
    """Create the log folder now (a stage starts); returns it (None when no command set one)."""
    if _run_log is None:
        return None
    _attach_run_log()
    _run_log.open()
    return _run_log.dir


def discard_logs() -> None:
    """The command was refused (bad input): write no log folder for it."""
    _close_run_log(keep=False)


def _close_run_log(*, keep: bool) -> None:
    global _run_log
    if _run_log is None:
        return
    if keep and _run_log.waiting:
        _run_log.open()
    for name in _FILE_LOGGERS:
        logging.getLogger(name).removeHandler(_run_log)
    _run_log.close()
    _run_log = None


def _at_exit() -> None:
    """A command that was not refused keeps its log, also when it failed before its first stage."""
    try:
        if _run_log is not None:
            _run_log.open()
            if _run_log.file is not None:
                _run_log.file.flush()
    except OSError:
        pass
    collect_worker_logs()


def _note_session() -> None:
    """Remember Ray's session log folder and this driver's job id (at exit Ray has shut down and no longer says).
    Only when that folder is on this machine: a local Ray, or a driver on the cluster's head node."""
    global _session
    try:
        import ray

        node = ray._private.worker._global_node
        if node is None or not ray.is_initialized():
            return
        path = Path(node.get_session_dir_path()) / "logs"
        if path.is_dir():
            _session = (path, ray.get_runtime_context().get_job_id())
    except Exception:
        pass


def collect_worker_logs(log_dirs: list[Path] | None = None) -> None:
    """Write LOG_DIR/workers.log: every non-empty stdout / stderr file of this job's Ray workers, oldest first,
    each under a header naming the actor (or task worker) and its pid."""
    if _session is None:
        return
    folder, job = _session
    try:
        files = sorted((f for f in folder.glob("worker-*") if f.suffix in (".out", ".err")
                        and f.stat().st_size and f.stem.split("-")[-2] == job), key=lambda f: f.stat().st_mtime)
    except OSError:
        return
    for log_dir in log_dirs if log_dirs is not None else list(_log_dirs):
        try:
            with open(log_dir / WORKERS_FILE, "w", encoding="utf-8") as out:
                for f in files:
                    lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
                    name = next((line.split(":", 2)[2] for line in lines[:3] if line.startswith(":actor_name:")),
                                "task worker")
                    body = [line for line in lines if not line.startswith((":job_id:", ":actor_name:", ":task_name:"))]
                    if any(line.strip() for line in body):  # Ray writes these headers into every file
                        out.write(f"===== {name}, pid {f.stem.split('-')[-1]} ({f.name}) =====\n")
                        out.writelines(line + "\n" for line in body)
        except OSError:
            pass  # the run folder is gone (a test's temporary folder): nothing to keep
