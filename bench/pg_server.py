"""A PostgreSQL server of its own on a loopback port, for the tests and the benchmarks: the machine's PostgreSQL
binaries (Debian's /usr/lib/postgresql/N/bin, or pg_ctl on PATH), else the ones the pgserver wheel ships; password
authentication (scram-sha-256) over TCP. PostgreSQL refuses to run as root: as root it runs as the `postgres`
system user (else `nobody`)."""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    """Where initdb and pg_ctl are."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(cand, "initdb").exists():
            return Path(cand)
    if shutil.which("pg_ctl") and Path(os.path.realpath(shutil.which("pg_ctl"))).with_name("initdb").exists():
        return Path(os.path.realpath(shutil.which("pg_ctl"))).parent
    spec = importlib.util.find_spec("pgserver")
    if not spec or not spec.submodule_search_locations:
        raise RuntimeError("no PostgreSQL here and no pgserver wheel: run make setup")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@contextmanager
def postgres_server(password: str) -> Iterator[str]:
    """Start a server in a temporary folder (removed after); yields its URL, postgresql://postgres@127.0.0.1:PORT/
    postgres (the password is `password`, never in the URL)."""
    bindir = pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="llambert-pg-", dir="/tmp"))
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            entry = pwd.getpwnam("nobody")
        # subprocess drops to that user itself: no runuser/su needed (a fresh machine's PATH may lack /usr/sbin)
        run_as = dict(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                      env={**os.environ, "HOME": str(base), "USER": entry.pw_name})
        os.chown(base, entry.pw_uid, entry.pw_gid)
    (base / "pw").write_text(password)
    if run_as:
        os.chown(base / "pw", run_as["user"], -1)
    port = free_port()
    data = base / "data"

    def pg(*args: str, check: bool = True) -> None:
        subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=120, cwd=base, **run_as)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={base / 'pw'}", "-E", "UTF8",
       "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync")
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o",
       f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)
