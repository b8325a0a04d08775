"""Repack a wheel without the parts a device run does not need (a carried wheel counts toward the 64 MiB that
travels to the GPU machine): the named path prefixes and suffixes are left out, and so are their RECORD lines,
so `pip install --no-deps` of the result is a valid install.

    python bench/strip_wheel.py IN.whl OUT_DIR --drop ray/jars/ ray/rllib/ ray/dashboard/client/ --drop-suffix .map \
        --strip-symbols ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet

--strip-symbols runs `strip --strip-unneeded` on those ELF files (their static symbol tables go; what the dynamic
loader needs stays) and rewrites their RECORD hashes and sizes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import tempfile
import zipfile
from pathlib import Path


def _strip_symbols(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d, "elf")
        f.write_bytes(data)
        subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)
        return f.read_bytes()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _is_record(name: str) -> bool:
    """The wheel's own RECORD (not those of packages it vendors, deeper down)."""
    return name.count("/") == 1 and name.endswith(".dist-info/RECORD")


def strip(src: Path, out_dir: Path, drop: list[str], drop_suffix: list[str],
          strip_symbols: list[str] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    gone = 0
    changed: dict[str, bytes] = {}

    def keep(name: str) -> bool:
        return not any(name.startswith(p) for p in drop) and not any(name.endswith(s) for s in drop_suffix)

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if not keep(info.filename):
                gone += 1
                continue
            data = zin.read(info)
            if info.filename in (strip_symbols or []):
                data = changed[info.filename] = _strip_symbols(data)
            if _is_record(info.filename):
                continue  # written last, once every changed file is known
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        for info in zin.infolist():
            if _is_record(info.filename):
                lines = []
                for ln in zin.read(info).decode().splitlines():
                    name = ln.split(",")[0]
                    if not ln or not keep(name):
                        continue
                    if name in changed:
                        ln = f"{name},{_record_hash(changed[name])},{len(changed[name])}"
                    lines.append(ln)
                zout.writestr(info, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    print(f"{dst}: {gone} files left out, {src.stat().st_size / 2**20:.1f} -> {dst.stat().st_size / 2**20:.1f} MiB")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--drop", nargs="*", default=[], help="path prefixes inside the wheel to leave out")
    ap.add_argument("--drop-suffix", nargs="*", default=[], help="file name endings to leave out")
    ap.add_argument("--strip-symbols", nargs="*", default=[], help="ELF files whose symbol tables to strip")
    args = ap.parse_args()
    strip(args.wheel, args.out_dir, args.drop, args.drop_suffix, args.strip_symbols)


if __name__ == "__main__":
    main()
