"""A team's stores on one machine: PostgreSQL, an S3 server and `mlflow server`, on 127.0.0.1 only.

The stack a team runs for real (a managed PostgreSQL, a bucket, an MLflow tracking server) has the
same three parts; this module starts local stand-ins of each, for `make services` (a person trying
the team setup) and for the tests, and always stops them:

    with team_stack("work/services") as stack:      # or: python -m medmat.services [--root DIR]
        stack.env()      # MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, AWS_* for clients
        stack.optuna_url # postgresql://... for `search.storage`

- PostgreSQL: the server binaries bundled in the `pgserver` wheel (nothing from the system), run
  directly (`initdb`, then `postgres -h 127.0.0.1 -p PORT`) so that it listens on loopback TCP, which
  MLflow and Optuna need (pgserver itself serves a Unix socket only). PostgreSQL refuses to run as
  root; as root the server runs as the `nobody` user, so its data folder must be reachable by it.
- S3: moto's server (`python -m moto.server`), an in-memory S3 API; one bucket is created.
- MLflow: `mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://bucket/mlflow`.
  Clients log artifacts through the server (proxied artifacts), so only the server needs S3 access.

Every server runs in its own process group and is stopped as a group (mlflow forks workers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# moto accepts any credentials; clients still need some to sign requests.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "medmat", "AWS_SECRET_ACCESS_KEY": "medmat-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
DATABASES = ("mlflow", "optuna")


class ServiceError(RuntimeError):
    """A server did not start; the message names it and ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        """Signal the whole process group, then kill what is left after `timeout` seconds."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, self.stop_signal)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _spawn(name: str, cmd: list[str], log_path: Path, *, env: dict | None = None, user: str | None = None,
           stop_signal: int = signal.SIGTERM) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True, user=user,
                                group=user and _primary_group(user))
    return Server(name, proc, log_path, stop_signal)


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _wait(server: Server, ready, timeout: float) -> None:
    """Poll `ready()` until it is true; a server that exits or stays silent is a ServiceError."""
    deadline = time.time() + timeout
    while True:
        if server.proc.poll() is not None:
            raise ServiceError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not listening yet (connection refused, 503 while migrating)
            pass
        if time.time() > deadline:
            server.stop()
            raise ServiceError(f"{server.name} not ready within {timeout:.0f} s:\n{server.log_tail()}")
        time.sleep(0.3)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


# ---- PostgreSQL -----------------------------------------------------------------------------------
def start_postgres(data_dir: Path, port: int | None = None, timeout: float = 60) -> tuple[Server, str]:
    """PostgreSQL 16 from the pgserver wheel on 127.0.0.1:port, trust auth for user `postgres`.

    Returns (server, base URL without a database). The databases of DATABASES are created."""
    bin_dir = _postgres_bin()
    data_dir = Path(data_dir).resolve()
    port = port or free_port()
    user = "nobody" if os.geteuid() == 0 else None  # postgres refuses to run as root
    data_dir.mkdir(parents=True, exist_ok=True)
    if user:
        uid = __import__("pwd").getpwnam(user).pw_uid
        os.chown(data_dir, uid, _primary_group(user))
        blocked = _blocked_parent(data_dir)
        if blocked is not None:
            raise ServiceError(f"postgres: {data_dir}: running as root, the server runs as '{user}', "
                               f"who cannot enter {blocked}; use a folder under /tmp or a world-readable path")
        if _blocked_parent(bin_dir) is not None:
            # e.g. a virtualenv under /root: give the server a copy of the binaries it can reach, in
            # the wheel's own layout (the binaries find their libraries at $ORIGIN/../../../pgserver.libs).
            import shutil

            site = bin_dir.parents[2]
            copy = data_dir / "site"
            for rel in ("pgserver/pginstall", "pgserver.libs"):
                if (site / rel).exists() and not (copy / rel).exists():
                    shutil.copytree(site / rel, copy / rel, symlinks=True)
            bin_dir = copy / "pgserver" / "pginstall" / "bin"
    pgdata = data_dir / "data"
    log = data_dir / "postgres.log"  # opened by this process: the server inherits the descriptor
    if not (pgdata / "PG_VERSION").exists():
        res = subprocess.run([str(bin_dir / "initdb"), "-D", str(pgdata), "--auth=trust", "-U",
                              "postgres", "--encoding=utf8", "--no-sync"], capture_output=True, text=True,
                             user=user, group=user and _primary_group(user))
        if res.returncode != 0:
            raise ServiceError(f"postgres: initdb {pgdata} failed:\n{res.stdout[-1500:]}{res.stderr[-1500:]}")
    # SIGINT = PostgreSQL's "fast shutdown" (SIGTERM would wait for every client to disconnect).
    server = _spawn("postgres", [str(bin_dir / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1",
                                 "-p", str(port), "-k", str(data_dir), "-c", "fsync=off"],
                    log, user=user, stop_signal=signal.SIGINT)
    base = f"postgresql://postgres@127.0.0.1:{port}"

    def ready() -> bool:
        import psycopg

        psycopg.connect(f"{base}/postgres", connect_timeout=2).close()
        return True

    _wait(server, ready, timeout)
    create_databases(base, DATABASES)
    return server, base


def _blocked_parent(path: Path) -> Path | None:
    """The first folder above `path` that other users may not enter (no o+x), or None."""
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _postgres_bin() -> Path:
    """The wheel's server binaries, found without importing pgserver (its import sets up runtime
    folders and locks for its own socket-only server, which is not used here)."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("postgres: the pgserver wheel is not installed (pip install -c constraints.txt pgserver)")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def create_databases(base_url: str, names: tuple[str, ...]) -> None:
    import psycopg

    # autocommit: CREATE DATABASE cannot run inside a transaction
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        for name in names:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')


# ---- S3 -------------------------------------------------------------------------------------------
def start_s3(log_path: Path, bucket: str, port: int | None = None, timeout: float = 60) -> tuple[Server, str]:
    """moto's S3 server on 127.0.0.1:port with `bucket` created; returns (server, endpoint URL)."""
    port = port or free_port()
    server = _spawn("s3 (moto)", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    log_path)
    endpoint = f"http://127.0.0.1:{port}"
    _wait(server, lambda: _http_ok(f"{endpoint}/moto-api/"), timeout)
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return server, endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])


# ---- MLflow ---------------------------------------------------------------------------------------
def start_mlflow(log_path: Path, backend_uri: str, artifacts: str, s3_endpoint: str, port: int | None = None,
                 timeout: float = 120) -> tuple[Server, str]:
    """`mlflow server` on PostgreSQL + S3, artifacts proxied; returns (server, tracking URL)."""
    port = port or free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
           # no background job workers: nothing here submits server-side jobs
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = _spawn("mlflow server", cmd, log_path, env=env)
    url = f"http://127.0.0.1:{port}"
    _wait(server, lambda: _http_ok(f"{url}/health"), timeout)
    return server, url


# ---- the stack ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TeamStack:
    root: Path
    bucket: str
    postgres_url: str  # without database: <postgres_url>/mlflow, <postgres_url>/optuna
    s3_endpoint: str
    tracking_uri: str
    servers: list[Server]

    @property
    def optuna_url(self) -> str:
        return f"{self.postgres_url}/optuna"

    @property
    def mlflow_db_url(self) -> str:
        return f"{self.postgres_url}/mlflow"

    @property
    def dvc_remote(self) -> str:
        return f"s3://{self.bucket}/dvc"

    def env(self) -> dict[str, str]:
        """What a client process needs: MLflow (runs, artifacts through the server), DVC and boto3."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                **S3_CREDENTIALS}

    def stop(self) -> None:
        for server in reversed(self.servers):  # mlflow first: it holds connections to postgres
            server.stop()

    def describe(self) -> str:
        env = "\n".join(f"  export {k}={v}" for k, v in self.env().items())
        return (f"PostgreSQL  {self.postgres_url}  (databases: {', '.join(DATABASES)})\n"
                f"S3          {self.s3_endpoint}  bucket s3://{self.bucket}\n"
                f"MLflow      {self.tracking_uri}  (runs in {self.mlflow_db_url}, artifacts in "
                f"s3://{self.bucket}/mlflow)\n\n"
                f"Environment for clients:\n{env}\n\n"
                f"params.yaml (or the env above):\n"
                f"  tracking:\n    tracking_uri: {self.tracking_uri}\n"
                f"  search:\n    storage: {self.optuna_url}\n\n"
                f"DVC remote:\n  dvc remote add -d team {self.dvc_remote}\n"
                f"  dvc remote modify team endpointurl {self.s3_endpoint}\n")


@contextlib.contextmanager
def team_stack(root: str | os.PathLike, bucket: str = "medmat", *, pg_port: int | None = None,
               s3_port: int | None = None, mlflow_port: int | None = None) -> Iterator[TeamStack]:
    """Start PostgreSQL, S3 and mlflow server under `root` (logs, database files); stop all on exit."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # the database server runs as `nobody` (see start_postgres): let it in
        root.chmod(root.stat().st_mode | 0o711)
    servers: list[Server] = []
    stack = None
    try:
        pg, pg_url = start_postgres(root / "postgres", pg_port)
        servers.append(pg)
        s3, endpoint = start_s3(root / "s3.log", bucket, s3_port)
        servers.append(s3)
        ml, url = start_mlflow(root / "mlflow.log", f"{pg_url}/mlflow", f"s3://{bucket}/mlflow", endpoint, mlflow_port)
        servers.append(ml)
        stack = TeamStack(root, bucket, pg_url, endpoint, url, servers)
        yield stack
    finally:
        for server in reversed(servers):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmat.services",
                                     description="Start PostgreSQL + S3 + mlflow server on 127.0.0.1 "
                                                 "until Ctrl-C (the team stores, locally).")
    parser.add_argument("--root", default=None,
                        help="folder for database files and logs (default: a new folder under /tmp)")
    parser.add_argument("--bucket", default="medmat")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    import tempfile

    root = args.root or tempfile.mkdtemp(prefix="medmat-services-")
    try:
        with team_stack(root, args.bucket, pg_port=args.pg_port, s3_port=args.s3_port,
                        mlflow_port=args.mlflow_port) as stack:
            print(stack.describe(), flush=True)
            print(f"Logs and database files: {stack.root} ({'kept' if args.root else 'removed'} on exit). "
                  "Ctrl-C stops all three servers.", flush=True)
            for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job starts with it ignored
                signal.signal(sig, lambda *_: sys.exit(0))
            while all(s.proc.poll() is None for s in stack.servers):
                time.sleep(1)
            dead = [s for s in stack.servers if s.proc.poll() is not None]
            print(f"{dead[0].name} stopped by itself:\n{dead[0].log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except ServiceError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.root is None:  # our own temporary folder: the S3 objects are gone anyway
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
