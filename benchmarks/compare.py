"""arqd side by side with peer job queues: SAQ, arq, huey and RQ on Redis, procrastinate on
PostgreSQL.

    python -m benchmarks.compare [--only arqd,saq,arq,huey,rq,procrastinate] [--skip-install]
                                 [--jobs 10000] [--rtt 500] [--workloads noop,sleep,rtt,recovery]
                                 [--quick]

Workloads (each row and each workload in a process of its own; ``benchmarks/peers/`` has one
module per system, whose docstring says exactly what it runs and with which settings):

- noop: ``--jobs`` (10,000) no-op jobs submitted with no worker running (enqueue rate), then
  ONE worker process runs them all (processing rate: jobs / seconds from the worker's start to
  the last job done).
- sleep: ``--jobs``/5 (2,000) jobs that each sleep 10 ms, pre-enqueued, at concurrency 100.
  The ideal is 100 / 10 ms = 10,000 jobs/s; the figure is also shown as a % of it.
- rtt: submit one job and wait for its result, ``--rtt`` (500) times in sequence after 50
  warm-ups, with a worker running: p50 / p95 / p99 in ms.
- recovery: a 30 s job; its worker is SIGKILLed one second after the job started and a fresh
  worker starts at once: seconds from the kill until the job starts again and until it is done,
  or never (not within 90 s). arqd runs it on the daemon with a 5 s visibility timeout (its
  target: back within VT + 2 s, no job lost).

Rows: ``arqd_sqlite`` (in-process ``arqd.Client`` + ``arqd.App`` pool on sqlite),
``arqd_http`` (``arqd serve`` on sqlite, over HTTP, with a recovery figure), ``arqd_memory``
(in-process on the memory backend: a ceiling), ``arqd_postgres`` (in-process on PostgreSQL; its
round trips cross two processes, a client here and a daemon running the jobs) and
``arqd_postgres_http`` (the daemon on PostgreSQL, with a recovery figure), then the peers. Each
peer runs with its documented fastest settings (see ``benchmarks/peers/__init__.py``) from its
own virtual environment, ``.venv-peers/`` (made on first run from ``requirements-peers.txt``,
reused after), against a Redis (no persistence) or a PostgreSQL cluster started for this run
on 127.0.0.1 and stopped at its end (apt-get installs either when missing).

Output: the machine, Python and every version; one table with a row per system, plus the best
peer of each figure and arqd's ratio to it (``arqd_sqlite`` ÷ best peer; ``arqd_http`` for
recovery): above 1 is better for rates, below 1 is better for latencies and seconds. The last
line is one JSON object with flat keys: ``<row>_<figure>`` for every row and figure (null when
not measured or never), ``best_peer_<figure>``, ``best_peer_name_<figure>``, ``ratio_<figure
without its unit>`` (``ratio_noop_process``), ``ratio_pg_<figure>`` (``arqd_postgres`` ÷
procrastinate), ``ratio_redis_<figure>`` (``arqd_redis`` ÷ the best of SAQ, arq, huey and RQ;
the ``_http`` rows for recovery), ``<row>_error`` for a row that failed, the sizes,
and ``version_<package>``. ``--quick`` runs small sizes (1,000 jobs, 50 round trips, a 5 s
recovery job) to smoke-test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/<name>.py`: import from the root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.peers.common import WORKLOADS, descendants, die_with_parent
from benchmarks.peers.services import Postgres, Redis, Service, ServiceError

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-peers"
REQUIREMENTS = ROOT / "benchmarks" / "requirements-peers.txt"
BENCH_TIMEOUT = 900.0  # seconds for one system's workload before it is stopped
INSTALL_TIMEOUT = 1200.0
STOP_GRACE = 10.0  # seconds a benchmark process gets to stop its workers after SIGTERM
CONCURRENCY = 100
SLEEP_MS = 10.0
PACKAGES = ("saq", "arq", "huey", "rq", "procrastinate", "redis", "hiredis", "psycopg")  # versions


@dataclass(frozen=True)
class System:
    key: str
    label: str
    module: str
    workloads: tuple[str, ...]
    broker: str | None = None  # "redis" or "postgres" for a peer
    extra: tuple[str, ...] = ()
    package: str | None = None  # a peer's distribution name

    @property
    def peer(self) -> bool:
        return self.package is not None


ARQD = "benchmarks.peers.arqd_bench"
SYSTEMS = (
    System(
        "arqd_sqlite", "arqd sqlite, in-process", ARQD, WORKLOADS[:3], extra=("--mode", "sqlite")
    ),
    System("arqd_http", "arqd daemon, HTTP, sqlite", ARQD, WORKLOADS, extra=("--mode", "http")),
    System(
        "arqd_memory", "arqd memory, in-process", ARQD, WORKLOADS[:3], extra=("--mode", "memory")
    ),
    System(
        "arqd_postgres",
        "arqd postgres, in-process",
        ARQD,
        WORKLOADS[:3],
        "postgres",
        extra=("--mode", "postgres"),
    ),
    System(
        "arqd_postgres_http",
        "arqd daemon, HTTP, postgres",
        ARQD,
        WORKLOADS,
        "postgres",
        extra=("--mode", "http_postgres"),
    ),
    System(
        "arqd_redis",
        "arqd redis, in-process",
        ARQD,
        WORKLOADS[:3],
        "redis",
        extra=("--mode", "redis"),
    ),
    System(
        "arqd_redis_http",
        "arqd daemon, HTTP, redis",
        ARQD,
        WORKLOADS,
        "redis",
        extra=("--mode", "http_redis"),
    ),
    System("saq", "SAQ (Redis)", "benchmarks.peers.saq_bench", WORKLOADS, "redis", package="saq"),
    System("arq", "arq (Redis)", "benchmarks.peers.arq_bench", WORKLOADS, "redis", package="arq"),
    System(
        "huey", "huey (Redis)", "benchmarks.peers.huey_bench", WORKLOADS, "redis", package="huey"
    ),
    System("rq", "RQ (Redis)", "benchmarks.peers.rq_bench", WORKLOADS, "redis", package="rq"),
    System(
        "procrastinate",
        "procrastinate (PostgreSQL)",
        "benchmarks.peers.procrastinate_bench",
        WORKLOADS,
        "postgres",
        package="procrastinate",
    ),
)
BY_KEY = {s.key: s for s in SYSTEMS}

# One line per row: what it ran with (each module's docstring has the whole story).
SETTINGS = {
    "arqd_sqlite": "concurrency 100, workers.batch 200; Client.submit_many(1,000) / Client.wait",
    "arqd_http": "same pool in `arqd serve`; POST /v1/jobs/batch, long-poll ?wait=; VT 5 s",
    "arqd_memory": "as arqd_sqlite on the memory backend",
    "arqd_postgres": "as arqd_sqlite on PostgreSQL (pool_size 10); rtt across two processes: "
    "Client.submit/wait here, an `arqd serve` runs the job (NOTIFY both ways)",
    "arqd_postgres_http": "as arqd_http on PostgreSQL",
    "arqd_redis": "as arqd_sqlite on Redis; rtt across two processes, as arqd_postgres",
    "arqd_redis_http": "as arqd_http on Redis",
    "saq": "Worker(concurrency=100); apply(poll_interval=1ms); heartbeat=5 + job.update()/s, "
    "sweep 1 s",
    "arq": "Worker(max_jobs=100, poll_delay=1ms); job.result(poll_delay=1ms); "
    "job_timeout = job + 5 s",
    "huey": "RedisHuey(blocking, notify_result); 1 thread (noop, rtt), 100 threads (sleep)",
    "rq": "SimpleWorker; 100 worker processes for sleep; latest_result(timeout) (XREAD); "
    "recovery: forking Worker, Retry(3), monitoring 1 s, maintenance 1 s",
    "procrastinate": "concurrency 100, LISTEN/NOTIFY; status polled every 1 ms; "
    "retry_stalled_jobs every 1 s, heartbeat 1 s, stalled after 5 s",
}


@dataclass(frozen=True)
class Figure:
    key: str
    header: str
    higher_is_better: bool
    ratio: bool = True  # a ratio line for it (% of ideal would repeat the jobs/s ratio)

    @property
    def short(self) -> str:
        for unit in ("_per_s", "_ms", "_s"):
            if self.key.endswith(unit):
                return self.key[: -len(unit)]
        return self.key


FIGURES = (
    Figure("noop_enqueue_per_s", "enqueue/s", True),
    Figure("noop_process_per_s", "process/s", True),
    Figure("sleep_per_s", "sleep/s", True),
    Figure("sleep_pct_ideal", "% ideal", True, ratio=False),
    Figure("rtt_p50_ms", "rtt p50", False),
    Figure("rtt_p95_ms", "rtt p95", False),
    Figure("rtt_p99_ms", "rtt p99", False),
    Figure("recovery_rerun_s", "rerun s", False),
    Figure("recovery_done_s", "done s", False),
)
WORKLOAD_OF = {f.key: f.key.split("_")[0] for f in FIGURES}
BASE_ROW = {"recovery_rerun_s": "arqd_http", "recovery_done_s": "arqd_http"}  # else arqd_sqlite


@dataclass(frozen=True)
class SameServer:
    """arqd on one broker against the best peer on the same server (``ratio_<prefix>…``)."""

    prefix: str  # of the JSON keys: ratio_pg_noop_process
    label: str  # of the table's line
    row: str  # arqd's in-process row; its daemon row (``row + "_http"``) for recovery
    peers: tuple[str, ...]


SAME_SERVER = (
    SameServer("pg_", "arqd pg ÷ procrastinate", "arqd_postgres", ("procrastinate",)),
    SameServer("redis_", "arqd redis ÷ best", "arqd_redis", ("saq", "arq", "huey", "rq")),
)


@dataclass
class Row:
    system: System
    figures: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # workload -> why it has no figures
    measured: set[str] = field(default_factory=set)  # workloads that ran to the end


@dataclass(frozen=True)
class Sizes:
    jobs: int
    sleep_jobs: int
    rtt: int
    job_seconds: float
    give_up: float


class SetupError(Exception):
    """The peers' environment could not be made; the message says why."""


# --- the peers' virtual environment ------------------------------------------------------------


def peers_python(skip_install: bool) -> Path:
    """``.venv-peers/bin/python``, made and filled from requirements-peers.txt when missing or
    when the requirements changed since it was filled."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if skip_install:
        if not python.exists():
            raise SetupError(f"{VENV.name}/ does not exist and --skip-install was given")
        return python
    installed = python.exists() and stamp.exists() and stamp.read_text() == digest
    if installed and all(peer_versions(python).get(s.package or "") for s in SYSTEMS if s.peer):
        return python
    progress(f"installing the peers into {VENV.name}/ (first run only)")
    if not python.exists():
        run_checked([sys.executable, "-m", "venv", str(VENV)], "python -m venv")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    try:
        run_checked([*pip, "-r", str(REQUIREMENTS)], "pip install -r requirements-peers.txt")
    except SetupError as exc:  # one by one, so one broken peer does not take the rest down
        progress(f"{exc}; installing each peer on its own")
        for system in SYSTEMS:
            if system.package:
                with contextlib.suppress(SetupError):
                    run_checked([*pip, "-c", str(REQUIREMENTS), system.package], system.package)
        return python
    stamp.write_text(digest)
    return python


def run_checked(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if "ignored" not in ln]
        raise SetupError(f"`{what}` failed: {' / '.join(lines[-3:])}")


def peer_versions(python: Path) -> dict[str, str | None]:
    code = (
        "import json, importlib.metadata as m\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{p: v(p) for p in {PACKAGES!r}}}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    try:
        versions: dict[str, str | None] = json.loads(out.stdout)
    except json.JSONDecodeError:
        return dict.fromkeys(PACKAGES)
    return versions


# --- running one workload ----------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_command(
    python: Path, system: System, workload: str, sizes: Sizes, url: str, tmp: str
) -> list[str]:
    jobs = {"noop": sizes.jobs, "sleep": sizes.sleep_jobs, "rtt": sizes.rtt, "recovery": 1}
    return [
        str(python), "-m", system.module, *system.extra,
        "--workload", workload,
        "--jobs", str(jobs[workload]),
        "--concurrency", str(CONCURRENCY),
        "--sleep-ms", str(SLEEP_MS),
        "--job-seconds", str(sizes.job_seconds),
        "--give-up", str(sizes.give_up),
        "--url", url,
        "--tmp", tmp,
    ]  # fmt: skip


def run_bench(cmd: list[str]) -> dict[str, Any]:
    """Run one benchmark process; its figures from the JSON on its last stdout line. Stopped
    with everything it started on timeout, Ctrl-C or any exception."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # our Ctrl-C is ours to pass on, in order
        preexec_fn=die_with_parent,
    )
    try:
        out, err = proc.communicate(timeout=BENCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        raise RuntimeError(f"timed out after {BENCH_TIMEOUT:g} s") from None
    except BaseException:
        stop_tree(proc)
        raise
    lines = out.strip().splitlines()
    if proc.returncode == 0 and lines:
        with contextlib.suppress(json.JSONDecodeError):
            figures: dict[str, Any] = json.loads(lines[-1])
            return figures
    why = [ln for ln in err.strip().splitlines() if ln.strip()] or lines or ["no output"]
    raise RuntimeError(f"exit {proc.returncode}: {why[-1].strip()[:300]}")


def stop_tree(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the benchmark and every process below it, SIGKILL what is left after a grace."""
    tree = [proc.pid, *descendants(proc.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [*tree, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


# --- brokers -------------------------------------------------------------------------------------


class Brokers:
    """Starts Redis and PostgreSQL on first use; ``close()`` stops whatever started."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.failures: dict[str, str] = {}

    def url(self, kind: str) -> str:
        if kind in self.failures:
            raise ServiceError(self.failures[kind])
        if kind not in self.services:
            progress(f"starting {kind}")
            service = Redis() if kind == "redis" else Postgres()
            try:
                self.services[kind] = service.start()
            except ServiceError as exc:
                service.close()
                self.failures[kind] = str(exc)
                raise
        return self.services[kind].url

    def versions(self) -> dict[str, str]:
        return {kind: s.version() for kind, s in self.services.items()}

    def close(self) -> None:
        for service in self.services.values():
            service.close()


# --- the run -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default="",
        help="comma-separated rows: arqd (all seven), arqd_sqlite, arqd_http, arqd_memory, "
        "arqd_postgres, arqd_postgres_http, arqd_redis, arqd_redis_http, saq, arq, huey, rq, "
        "procrastinate",
    )
    p.add_argument("--skip-install", action="store_true", help="use .venv-peers as it is")
    p.add_argument("--jobs", type=int, help="noop jobs (10,000; 1,000 with --quick); sleep: /5")
    p.add_argument("--rtt", type=int, help="round trips (500; 50 with --quick)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="a subset of these")
    p.add_argument("--quick", action="store_true", help="small sizes, to smoke-test")
    args = p.parse_args()
    wanted = [w for w in args.only.replace(" ", "").split(",") if w]
    keys: list[str] = []
    for name in wanted or [s.key for s in SYSTEMS]:
        group = [s.key for s in SYSTEMS if s.key.startswith("arqd_")] if name == "arqd" else [name]
        for key in group:
            if key not in BY_KEY:
                p.error(f"--only: unknown row {key!r}")
            if key not in keys:
                keys.append(key)
    args.systems = [s for s in SYSTEMS if s.key in keys]
    args.workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
    jobs = args.jobs or (1000 if args.quick else 10_000)
    args.sizes = Sizes(
        jobs=jobs,
        sleep_jobs=max(100, jobs // 5),
        rtt=args.rtt or (50 if args.quick else 500),
        job_seconds=5.0 if args.quick else 30.0,
        give_up=75.0 if args.quick else 90.0,
    )
    return args


def measure(
    args: argparse.Namespace, brokers: Brokers, tmp: Path
) -> tuple[list[Row], dict[str, Any]]:
    rows = [Row(s) for s in args.systems]
    versions: dict[str, Any] = {}
    python: Path | None = None
    setup_error = ""
    if any(r.system.peer for r in rows):
        try:
            python = peers_python(args.skip_install)
            versions.update(peer_versions(python))
        except (SetupError, OSError, subprocess.TimeoutExpired) as exc:
            setup_error = f"peers' environment: {exc}"
    for row in rows:
        system = row.system
        for workload in [w for w in args.workloads if w in system.workloads]:
            why = ""
            if system.peer and python is None:
                why = setup_error
            elif system.peer and not versions.get(system.package or ""):
                why = f"{system.package} is not installed in {VENV.name}/"
            if why:
                row.errors[workload] = why
                continue
            try:
                url = brokers.url(system.broker) if system.broker else ""
                scratch = tempfile.mkdtemp(prefix=f"{system.key}-{workload}-", dir=tmp)
                interpreter = python if system.peer and python else Path(sys.executable)
                progress(f"{system.key}: {workload}")
                cmd = bench_command(interpreter, system, workload, args.sizes, url, scratch)
                row.figures.update(run_bench(cmd))
                row.measured.add(workload)
            except (ServiceError, RuntimeError, OSError) as exc:
                row.errors[workload] = str(exc)
                progress(f"{system.key}: {workload} failed: {exc}")
    versions.update({f"{k}-server": v for k, v in brokers.versions().items()})
    return rows, versions


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import arqd  # the arqd environment is this one

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "arqd": arqd.__version__,
    }


def best_peers(rows: list[Row]) -> dict[str, tuple[str, float]]:
    """Per figure, the best peer's (name, value); a figure no peer reached is absent."""
    best: dict[str, tuple[str, float]] = {}
    for fig in FIGURES:
        values = [
            (r.system.key, r.figures[fig.key])
            for r in rows
            if r.system.peer and r.figures.get(fig.key) is not None
        ]
        if values:
            pick = max if fig.higher_is_better else min
            best[fig.key] = pick(values, key=lambda kv: kv[1])
    return best


def ratios(rows: list[Row], best: dict[str, tuple[str, float]]) -> dict[str, float | None]:
    by_key = {r.system.key: r for r in rows}
    out: dict[str, float | None] = {}
    for fig in FIGURES:
        if not fig.ratio:
            continue
        peer = best.get(fig.key)
        out[fig.key] = ratio_of(by_key, BASE_ROW.get(fig.key, "arqd_sqlite"), peer and peer[1], fig)
    return out


def same_server_ratios(rows: list[Row], pair: SameServer) -> dict[str, float | None]:
    """arqd on one broker ÷ the best of its peers on the same server, per figure."""
    by_key = {r.system.key: r for r in rows}
    out: dict[str, float | None] = {}
    for fig in FIGURES:
        if not fig.ratio:
            continue
        values = [
            by_key[p].figures[fig.key]
            for p in pair.peers
            if p in by_key and by_key[p].figures.get(fig.key) is not None
        ]
        theirs = (max if fig.higher_is_better else min)(values) if values else None
        row = pair.row + "_http" if fig.key.startswith("recovery") else pair.row
        out[fig.key] = ratio_of(by_key, row, theirs, fig)
    return out


def ratio_of(by_key: dict[str, Row], row: str, theirs: float | None, fig: Figure) -> float | None:
    base = by_key.get(row)
    value = base.figures.get(fig.key) if base else None
    return round(value / theirs, 2) if value is not None and theirs else None


def cell(row: Row, fig: Figure) -> str:
    workload = WORKLOAD_OF[fig.key]
    if workload in row.errors:
        return "error"
    if workload not in row.measured:
        return "—"
    value = row.figures.get(fig.key)
    if value is None:
        return "never"
    return fmt(fig, value)


def fmt(fig: Figure, value: float) -> str:
    if fig.key.endswith("_per_s"):
        return f"{value:,.0f}"
    if fig.key.endswith("_ms"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def table(
    rows: list[Row],
    best: dict[str, tuple[str, float]],
    ratio: dict[str, float | None],
    same: dict[SameServer, dict[str, float | None]],
) -> str:
    header = ["system", *(f.header for f in FIGURES)]
    body = [[r.system.key, *(cell(r, f) for f in FIGURES)] for r in rows]
    body.append(
        [
            "best peer",
            *(
                f"{best[f.key][0]} {fmt(f, best[f.key][1])}" if f.key in best else "—"
                for f in FIGURES
            ),
        ]
    )
    body.append(
        [
            "arqd ÷ best",
            *(f"{ratio[f.key]:.2f}×" if ratio.get(f.key) is not None else "—" for f in FIGURES),
        ]
    )
    for pair, values in same.items():
        if any(v is not None for v in values.values()):
            cells = [
                f"{values[f.key]:.2f}×" if values.get(f.key) is not None else "—" for f in FIGURES
            ]
            body.append([pair.label, *cells])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for n, line in enumerate([header, *body]):
        cells = [line[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n in (0, len(rows)):
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(
    args: argparse.Namespace, rows: list[Row], versions: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    best = best_peers(rows)
    ratio = ratios(rows, best)
    same = {pair: same_server_ratios(rows, pair) for pair in SAME_SERVER}
    print(
        f"machine: {info['cores']} cores, {info['cpu']}; Python {info['python']}, "
        f"SQLite {info['sqlite']}, arqd {info['arqd']}"
    )
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    print(f"versions: {shown or '(no peer)'}")
    s = args.sizes
    print(
        f"sizes: noop {s.jobs:,} jobs; sleep {s.sleep_jobs:,} jobs × {SLEEP_MS:g} ms at "
        f"concurrency {CONCURRENCY} (ideal {CONCURRENCY * 1000 / SLEEP_MS:,.0f}/s); rtt {s.rtt} "
        f"round trips (ms); recovery: a {s.job_seconds:g} s job, seconds after the SIGKILL, "
        f"never = not within {s.give_up:g} s"
    )
    print()
    print(table(rows, best, ratio, same))
    print()
    print(
        "arqd ÷ best peer: arqd_sqlite (arqd_http for recovery); arqd pg ÷ procrastinate, "
        "arqd redis ÷ best: arqd_postgres, arqd_redis (their _http rows for recovery) against "
        "the peers on the same server; > 1 is better for rates, < 1 for latencies and seconds"
    )
    print("settings:")
    for r in rows:
        print(f"  {r.system.key}: {SETTINGS[r.system.key]}")
    for r in rows:
        for workload, why in r.errors.items():
            print(f"  ! {r.system.key} {workload}: {why}")
    return flat(
        args, rows, versions, info, best, {"": ratio, **{p.prefix: same[p] for p in SAME_SERVER}}
    )


def flat(
    args: argparse.Namespace,
    rows: list[Row],
    versions: dict[str, Any],
    info: dict[str, Any],
    best: dict[str, tuple[str, float]],
    ratio: dict[str, dict[str, float | None]],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        for fig in FIGURES:
            if WORKLOAD_OF[fig.key] in r.system.workloads:
                out[f"{r.system.key}_{fig.key}"] = r.figures.get(fig.key)
        if "recovery_vt_s" in r.figures:
            out[f"{r.system.key}_recovery_vt_s"] = r.figures["recovery_vt_s"]
        if "recovery_starts" in r.figures:
            out[f"{r.system.key}_recovery_starts"] = r.figures["recovery_starts"]
        if r.errors:
            out[f"{r.system.key}_error"] = "; ".join(f"{w}: {e}" for w, e in r.errors.items())
    for fig in FIGURES:
        name, value = best.get(fig.key, (None, None))
        out[f"best_peer_{fig.key}"] = value
        out[f"best_peer_name_{fig.key}"] = name
    for prefix, figures in ratio.items():  # ratio_<figure>, ratio_pg_<figure>
        for key, value in figures.items():
            out[f"ratio_{prefix}{next(f.short for f in FIGURES if f.key == key)}"] = value
    s = args.sizes
    out.update(
        jobs=s.jobs, sleep_jobs=s.sleep_jobs, sleep_ms=SLEEP_MS, concurrency=CONCURRENCY,
        rtt_round_trips=s.rtt, recovery_job_s=s.job_seconds, recovery_give_up_s=s.give_up,
        cores=info["cores"], cpu=info["cpu"], python=info["python"], sqlite=info["sqlite"],
        version_arqd=info["arqd"],
    )  # fmt: skip
    out.update({f"version_{k.replace('-', '_')}": v for k, v in versions.items()})
    return out


@contextlib.contextmanager
def interrupted_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops what it started."""

    def bye(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, bye)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    args = parse_args()
    info = machine()
    brokers = Brokers()
    try:
        with interrupted_as_exit(), tempfile.TemporaryDirectory(prefix="arqd-compare-") as tmp:
            try:
                rows, versions = measure(args, brokers, Path(tmp))
            finally:
                brokers.close()
    except KeyboardInterrupt:
        progress("interrupted: every process this run started is stopped")
        raise SystemExit(130) from None
    print(json.dumps(report(args, rows, versions, info)))


if __name__ == "__main__":
    main()
