"""A throwaway PostgreSQL cluster on 127.0.0.1 for one test session, from Debian's `postgresql` binaries.

The cluster has a password (so tests can check it never leaks) and two databases, `optuna` and `mlflow`:
the two stores cannot share one (both keep an `alembic_version` table). Without the binaries the tests
that use it skip with the reason; `.ci/run` installs them (`apt-get install -y postgresql`).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, PASSWORD = "search", "pg-secret-7f3a"


@dataclass
class Postgres:
    """Where the throwaway cluster listens and how to reach its databases."""

    port: int

    def url(self, database: str) -> str:
        """A SQLAlchemy URL of one database, password included."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"


def server_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, or None."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file() and (p / "pg_ctl").is_file()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def cluster_owner() -> str | None:
    """PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' system user to own a PostgreSQL cluster")
    return "postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_as(owner: str | None, command: list[str]) -> None:
    """Run a PostgreSQL tool as the cluster's owner, failing with its output."""
    prefix = ["runuser", "-u", owner, "--"] if owner else []
    done = subprocess.run(prefix + command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL server with databases `optuna` and `mlflow`, stopped after the session."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                    "(install them with: apt-get install -y postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install '.[postgres]'")
    owner = cluster_owner()
    folder = Path(tempfile.mkdtemp(prefix="search-postgres-"))  # not under pytest's 0700 root-only tmp
    (folder / "password").write_text(PASSWORD)
    if owner:
        shutil.chown(folder, owner)
        shutil.chown(folder / "password", owner)
    data, port = folder / "data", free_port()
    run_as(owner, [str(binaries / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={folder / 'password'}",
                   "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"])
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    run_as(owner, [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o", options,
                   "-w", "-t", "60", "start"])
    try:
        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres",
                             autocommit=True) as db:
            for name in ("optuna", "mlflow"):
                db.execute(f"CREATE DATABASE {name}")
        yield Postgres(port)
    finally:
        run_as(owner, [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60", "stop"])
        shutil.rmtree(folder, ignore_errors=True)
