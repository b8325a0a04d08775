"""What a labelling run produced, counted without holding it: the per-row outcome counts of a labels output (read a
frame at a time, or grouped by the database) and the summary `llambert label` prints and writes
(label_summary.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class LabelSummary:
    rows: int
    seconds: float
    rows_per_s: float
    label_counts: dict[str, int]
    accuracy: float | None = None  # against gold, over the rows that were labelled (failed rows left out)
    failed: int = 0  # rows the model could not label (label None, reason in the `error` column)
    errors: dict[str, int] | None = None  # the most frequent failure reasons, with their row counts
    precision: str | None = None  # the encoder's: float32, bfloat16 or int8 (label.dtype / label.quantize)
    kept: int = 0  # label.incremental: corpus rows the table held from this model with the same text (not relabelled)
    dropped: int = 0  # corpus rows left out for an empty or null text (corpus.empty_text: drop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        acc = f", accuracy vs gold {self.accuracy:.2%}" if self.accuracy is not None else ""
        if self.failed:
            acc += " (over the labelled rows)" if acc else ""
        at = f", {self.precision}" if self.precision else ""
        out = [f"labelled {self.rows - self.failed} of {self.rows} rows in {self.seconds:.1f}s "
               f"({self.rows_per_s:.1f} rows/s{at}){acc}",
               f"  labels {self.label_counts}"]
        if self.failed:
            out.append(f"  failed {self.failed} rows (label empty, reason in the `error` column): "
                       f"{self.errors or {}}")
        if self.dropped:
            out.append(f"  dropped {self.dropped} corpus rows with an empty or null text (corpus.empty_text: drop)")
        if self.kept:
            out.append(f"  kept {self.kept} rows labelled earlier by this model from the same text "
                       f"(incremental)")
        return out


# a failure reason is counted by its first 200 characters: the same error on rows of other lengths stays one reason
REASON_CHARS = 200


@dataclass
class OutputCounts:
    """What a labels output holds, counted a frame at a time: rows, labels of the labelled rows, failed rows and
    their reasons, and the labelled rows with gold (`graded`) and how many of them the model got right."""

    rows: int = 0
    failed: int = 0
    graded: int = 0
    correct: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    def ordered(self) -> OutputCounts:
        """These counts with label_counts most frequent first (ties by label, so runs agree)."""
        self.label_counts = dict(sorted(self.label_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return self

    @property
    def accuracy(self) -> float | None:
        """Against gold, over the labelled rows that have gold (failed rows left out); None without such rows."""
        return self.correct / self.graded if self.graded else None

    def top_errors(self, n: int = 5) -> dict[str, int]:
        """The n most frequent failure reasons with their row counts (ties in reason order, so runs agree)."""
        return dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:n])

    def add_group(self, label: str | None, reason: str | None, gold: str | None, n: int) -> None:
        """Add `n` rows that share a label, a failure reason (None: labelled) and a gold label (None: no gold)."""
        self.rows += n
        if reason is not None:
            self.failed += n
            self.reasons[str(reason)] = self.reasons.get(str(reason), 0) + n
            return
        self.label_counts[str(label)] = self.label_counts.get(str(label), 0) + n
        if gold is not None:
            self.graded += n
            self.correct += n if str(label) == str(gold) else 0

    def add(self, frame: pd.DataFrame) -> None:
        """Add the counts of one frame of a labels output (columns label, error[, gold])."""
        failed = frame["error"].notna()
        ok = frame[~failed]
        graded = ok[ok["gold"].notna()] if "gold" in ok else ok.iloc[:0]
        self.rows += len(frame)
        self.failed += int(failed.sum())
        self.graded += len(graded)
        if len(graded):  # a corpus without gold labels has no gold column at all
            self.correct += int((graded["label"].astype(str) == graded["gold"].astype(str)).sum())
        for into, counts in ((self.label_counts, ok["label"].value_counts()),
                             (self.reasons, frame.loc[failed, "error"].astype(str).str.slice(0, REASON_CHARS)
                              .value_counts())):
            for k, v in counts.items():
                into[str(k)] = into.get(str(k), 0) + int(v)


def output_counts(output: str | Path) -> OutputCounts:
    """Counts of a published labels output, read a frame at a time (data.iter_parquet_frames: only its label,
    error and gold columns, 65,536 rows a frame). The driver holds one frame, a few integers and one entry per label
    and per distinct failure reason (at most REASON_CHARS characters each), whatever the number of rows. Exact: it
    counts the rows the files hold. Read here rather than by Ray Data tasks: three narrow columns read at millions
    of rows a second, while each Ray Data read pays seconds of start-up (tens on a loaded 2-CPU machine)."""
    from llambert_ray.storage import iter_parquet_frames

    counts = OutputCounts()
    for frame in iter_parquet_frames(output, ["label", "error", "gold"]):
        counts.add(frame)
    return counts.ordered()


