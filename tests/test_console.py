"""console: the progress line (on a terminal and in a file), the run's log folder and the workers' logs."""

from __future__ import annotations

import io
import logging

import pytest

from llambert_ray import console, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_file_prints_whole_lines_with_rate_and_eta():
    import time

    out = io.StringIO()
    bar = progress.Progress("annotate", 60, done=4, stream=out, interval=0, live=False)  # 4 rows cached before
    bar.update(4)
    assert out.getvalue().startswith("annotate  4/60 rows") and "starting" in out.getvalue()
    bar.update(10)
    bar._first = (time.time() - 10, 10)  # as if the first rows had come 10 s ago
    bar.update(20)
    bar.close()
    lines = out.getvalue().splitlines()
    assert all("\r" not in line for line in lines) and len(lines) == 4
    assert "1.0 rows/s" in lines[2] and "ETA 40s" in lines[2]
    assert lines[-1].startswith("annotate  20/60 rows   33%") and " in " in lines[-1]


def test_progress_in_a_file_is_not_printed_for_every_update():
    out = io.StringIO()
    bar = progress.Progress("label", 1000, stream=out, live=False)  # default: at most every 5 s while moving
    for n in range(0, 1000, 10):
        bar.update(n)
    bar.close(done=1000)
    assert len(out.getvalue().splitlines()) <= 2


def test_progress_on_a_terminal_is_one_line_redrawn():
    term = _Terminal()
    bar = progress.Progress("train llm-stage1", 100, stream=term, live=True).start()
    bar.update(50)
    console.echo("  a line from the stage")  # clears the progress line, prints, redraws it
    bar.close(done=100)
    text = term.getvalue()
    assert "\r\x1b[K" in text and text.endswith("\n")
    assert text.count("\n") == 1  # only the final line ends a line on the terminal (echo went to stdout)
    assert "100/100 rows" in text.rsplit("\r\x1b[K", 1)[-1]


def test_a_refused_command_leaves_no_log_folder_and_a_run_keeps_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(console, "_session", None)
    logs = tmp_path / "out" / "logs"
    console.configure_logs(logs)
    logging.getLogger("llambert_ray.test").warning("before the first stage")
    console.discard_logs()
    assert not (tmp_path / "out").exists()

    console.configure_logs(logs)
    logging.getLogger("ray").info("Started a local Ray instance.")
    assert not logs.exists()  # waits in memory until a stage starts
    assert console.open_logs() == logs.resolve()
    logging.getLogger("llambert_ray.test").warning("during the stage")
    text = (logs / console.LOG_FILE).read_text()
    assert "Started a local Ray instance." in text and "during the stage" in text
    console.discard_logs()


def test_workers_log_gathers_this_jobs_worker_files(tmp_path, monkeypatch):
    session = tmp_path / "session" / "logs"
    session.mkdir(parents=True)
    (session / "worker-aa-01000000-11.err").write_text(
        ":job_id:01000000\n:actor_name:MapWorker(MapBatches(vLLMEngineStageUDF))\nINFO engine started\n")
    (session / "worker-bb-01000000-12.out").write_text(":job_id:01000000\n")  # headers only: left out
    (session / "worker-cc-02000000-13.out").write_text("another job's worker\n")
    (session / "raylet.out").write_text("not a worker\n")
    monkeypatch.setattr(console, "_session", (session, "01000000"))
    out = tmp_path / "logs"
    out.mkdir()
    console.collect_worker_logs([out])
    text = (out / console.WORKERS_FILE).read_text()
    assert "===== MapWorker(MapBatches(vLLMEngineStageUDF)), pid 11" in text and "INFO engine started" in text
    assert "pid 12" not in text and "another job" not in text and "raylet" not in text


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_count_reports_the_rows_of_a_ray_dataset(ray_local):
    import ray

    out = io.StringIO()
    with progress.Progress("label", 1000, stream=out, live=False) as bar:
        rows = bar.count(ray.data.range(1000, override_num_blocks=10).map_batches(lambda b: b)).take_all()
        # the counter actor gets the counts asynchronously: wait for the line's poller to see them all
        import time

        deadline = time.time() + 60
        while bar.done < 1000 and time.time() < deadline:
            time.sleep(0.2)
    assert len(rows) == 1000 and bar.done == 1000
    assert out.getvalue().splitlines()[-1].startswith("label  1000/1000 rows  100%")
