"""A check's result, as preflight and its parts report it: one row of the table `llambert preflight` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Check:
    check: str
    where: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def table(checks: list[Check]) -> str:
    lines = ["| check | where | status | detail | fix |", "|---|---|---|---|---|"]
    for c in checks:
        mark = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}[c.status]
        lines.append(f"| {c.check} | {c.where} | {mark} | {c.detail} | {c.fix} |")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"\npreflight: {len(checks)} checks, {fails} failed, {warns} warnings")
    return "\n".join(lines)


def checks_to_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
