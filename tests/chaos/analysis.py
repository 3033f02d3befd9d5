"""The verdict on a chaos run, from what was recorded: the handlers' record file, every daemon
incarnation's log, the chaos the driver dealt (and the stalls it observed), the calls multi-step
jobs made, the submits, and the final records and results. Pure functions over plain data, so
``test_analysis.py`` can feed them runs that break each rule and watch each rule fail.

The rules:

- every acknowledged job is found terminal (else it is *lost*), in the state its kind was
  designed to end in, with the result its payload determines (byte checksums for blobs);
- the submits of one group (one key) map to one stored job; no stored job is unknown;
- a lease runs its handler at most once;
- a job's executions, in lease order, are each a designed retry of the one before or a
  *duplicate execution*, and every duplicate is *explained*: the daemon that held the previous
  lease was killed, terminated or paused before the next lease (for the dynamodb run also: a
  burst of faults was injected on its proxy; for the postgres and redis runs: the server was
  restarted or frozen, which disrupts every daemon), or, observed rather than dealt, it stalled
  (its event loop stopped turning, or its backend requests hung) and itself logged the lease lost;
  on a shared sqlite file a daemon paused while holding the write lock stalls every daemon;
- a job has at most one terminal canonical log line, written by the daemon that held its last
  lease, for that attempt (none only when that daemon was killed right after the write);
- the stored record is the last lease's: same attempt, and a result blob named by that lease;
- a paused daemon whose jobs were taken over (a zombie) notices (``job.lease_lost``) and gets
  no late terminal outcome applied;
- multi-step jobs call their steps in order, and repeat a completed step only when explained.

A *stale run* — a handler started on a lease after the backend had already granted the job to
another lease — is counted apart (``stale_runs``): the pool could have known by its own clock
that the lease had expired (see the report of the chaos suite).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from arqd.model import Job

from .workload import STEP_NAMES, Call, Group

TERMINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
OUTCOME_EVENTS = TERMINAL_EVENTS | {"job.retrying", "job.released"}
KEPT_EVENTS = OUTCOME_EVENTS | {"job.lease_lost"}
# The database server (PostgreSQL, Redis) restarted or frozen (SIGSTOP): every daemon's chaos.
SERVER = frozenset({"server_restart", "server_pause"})
DEALT = frozenset({"kill", "term", "pause", "burst"}) | SERVER  # chaos the driver deals
OBSERVED = frozenset({"stall", "slow"})  # stalls the driver only observes
BACKEND_FAULTS = frozenset({"burst", "slow"}) | SERVER  # may fail an attempt not designed to
# A daemon killed this soon after it began writing a job's outcome may have died before the
# answer came back (and with it the job's log line): with injected faults botocore retries the
# write for a while.
MISSING_LINE_WINDOW = 30.0
# A lease taken over this soon after SIGCONT still counts as lost to the pause: the resumed
# daemon's first heartbeat (every 400 ms) may not have run yet.
ZOMBIE_GRACE = 1.0


@dataclass(frozen=True)
class Execution:
    """One run of a recorded handler: its lease (the ``started_at`` the lease wrote, and the
    token's prefix), process and times (``end`` None: it never completed)."""

    job: str
    attempt: int
    lease: float
    token: str | None
    pid: int
    start: float
    end: float | None = None
    outcome: str | None = None  # "ok", or "raised" by design


@dataclass(frozen=True)
class Disruption:
    """Something that can cost a daemon its leases, during [start, end].

    Dealt: ``kill`` (start == end), ``term`` (SIGTERM until exit), ``pause`` (SIGSTOP until
    SIGCONT), ``burst`` (faults injected on the slot's proxy; ``pid`` None: whichever
    incarnation ran), ``server_restart`` (the database server stopped until it answers
    again) and ``server_pause`` (it frozen until resumed), both ``stalls_all``. Observed:
    ``stall`` (the daemon's event loop did not turn), ``slow`` (a backend request through the
    slot's proxy took that long). ``stalls_all``: it disrupts every daemon (a pause that held the
    shared sqlite file's write lock; the database server's own chaos)."""

    kind: str
    slot: int
    pid: int | None
    start: float
    end: float
    stalls_all: bool = False
    faults: int = 0

    def hits(self, pid: int | None, slot: int | None, start: float, until: float) -> bool:
        """Whether this overlaps [start, until] and concerns daemon ``pid`` (of ``slot``);
        ``pid`` None (unknown daemon): any daemon."""
        if self.start > until or self.end < start:
            return False
        if self.stalls_all or pid is None:
            return True
        return self.pid == pid or (self.pid is None and self.slot == slot)


@dataclass(frozen=True)
class Line:
    """One log line of interest from one daemon incarnation."""

    pid: int
    event: str
    job: str | None
    attempt: int | None
    t: float
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything recorded about one run."""

    backend: str
    visibility_timeout: float
    groups: Mapping[str, Group]
    stored: Mapping[str, Job]  # every job the backend holds, final state
    results: Mapping[str, Any]  # job id → result read back (bytes or JSON) for succeeded jobs
    executions: Sequence[Execution]
    lines: Sequence[Line]
    disruptions: Sequence[Disruption]
    calls: Sequence[Call]
    slots: Mapping[int, int]  # pid → slot
    ended: Mapping[int, tuple[str, float]]  # pid → (how its incarnation ended, when)
    reloads: int = 0
    bad_reloads: int = 0
    faults: int = 0
    problems: Sequence[str] = ()  # violations the driver saw while dealing chaos


@dataclass
class Report:
    jobs: int = 0
    kills: int = 0
    terms: int = 0
    pauses: int = 0
    bursts: int = 0
    server_restarts: int = 0
    server_pauses: int = 0
    stalls: int = 0
    reloads: int = 0
    bad_reloads: int = 0
    faults: int = 0
    executions: int = 0
    duplicates: int = 0
    explained: int = 0
    by_stall: int = 0  # duplicates explained only by an observed stall
    retries: int = 0
    lost: int = 0
    zombies: int = 0
    zombies_refused: int = 0
    step_calls: int = 0
    unattributed_calls: int = 0  # step calls whose sending daemon could not be told
    blobs_checked: int = 0
    stale: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"chaos: jobs={self.jobs} kills={self.kills} pauses={self.pauses} "
            f"reloads={self.reloads} bad_reloads={self.bad_reloads} faults={self.faults} "
            f"duplicate_executions={self.duplicates} explained={self.explained} lost={self.lost}"
        )

    def details(self) -> str:
        return (
            f"chaos details: terms={self.terms} bursts={self.bursts} "
            f"server_restarts={self.server_restarts} server_pauses={self.server_pauses} "
            f"stalls={self.stalls} "
            f"executions={self.executions} designed_retries={self.retries} "
            f"explained_by_stall={self.by_stall} stale_runs={len(self.stale)} "
            f"zombies={self.zombies} zombies_refused={self.zombies_refused} "
            f"step_calls={self.step_calls} unattributed_calls={self.unattributed_calls} "
            f"blobs_checked={self.blobs_checked} violations={len(self.violations)}"
        )

    def fail(self, message: str) -> None:
        self.violations.append(message)


# --- reading what the processes wrote -------------------------------------------------------------


def read_executions(path: Path) -> list[Execution]:
    """Pair the record file's start and end lines by (job, lease, pid), in order."""
    starts: list[dict[str, Any]] = []
    ends: dict[tuple[str, float, int], list[dict[str, Any]]] = defaultdict(list)
    for rec in _json_lines(path):
        if rec["ev"] == "start":
            starts.append(rec)
        else:
            ends[rec["job"], rec["lease"], rec["pid"]].append(rec)
    out = []
    for s in starts:
        pending = ends.get((s["job"], s["lease"], s["pid"]))
        e = pending.pop(0) if pending else None
        out.append(
            Execution(
                job=s["job"],
                attempt=s["attempt"],
                lease=s["lease"],
                token=s["token"],
                pid=s["pid"],
                start=s["t"],
                end=None if e is None else e["t"],
                outcome=None if e is None else e["outcome"],
            )
        )
    return sorted(out, key=lambda x: (x.lease, x.start))


def read_stalls(path: Path, slots: Mapping[int, int], least: float) -> list[Disruption]:
    """The event-loop stalls of at least ``least`` seconds the daemons noted."""
    return [
        Disruption("stall", slots.get(rec["pid"], -1), rec["pid"], rec["t"], rec["t"] + rec["lag"])
        for rec in _json_lines(path)
        if rec["lag"] >= least
    ]


def read_lines(path: Path, pid: int) -> list[Line]:
    """The lines of one incarnation's log that the verdict needs."""
    out = []
    for rec in _json_lines(path):
        event = rec.get("event", "")
        if event in KEPT_EVENTS or event.startswith("backend."):
            stamp = datetime.fromisoformat(rec["timestamp"]).timestamp()
            out.append(Line(pid, event, rec.get("job_id"), rec.get("attempt"), stamp, rec))
    return out


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    text = path.read_text(errors="replace") if path.exists() else ""
    for raw in text.splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9, or a traceback
        if isinstance(rec, dict):
            out.append(rec)
    return out


# --- the verdict ----------------------------------------------------------------------------------


@dataclass
class _Job:
    """What the verdict knows of one job."""

    record: Job
    group: Group
    runs: list[Execution]  # in lease order
    lines: list[Line]


def analyse(run: Run) -> Report:
    report = Report(
        reloads=run.reloads,
        bad_reloads=run.bad_reloads,
        faults=run.faults,
        executions=len(run.executions),
    )
    counts = Counter(d.kind for d in run.disruptions)
    report.kills, report.terms, report.pauses = counts["kill"], counts["term"], counts["pause"]
    report.bursts, report.stalls = counts["burst"], counts["stall"] + counts["slow"]
    report.server_restarts = counts["server_restart"]
    report.server_pauses = counts["server_pause"]
    report.violations.extend(run.problems)
    runs: dict[str, list[Execution]] = defaultdict(list)
    for ex in run.executions:
        runs[ex.job].append(ex)
    lines: dict[str | None, list[Line]] = defaultdict(list)
    for ln in run.lines:
        lines[ln.job].append(ln)
    _check_leases(run, report)
    jobs = _check_groups(run, report)
    report.jobs = len(jobs)
    for job_id in sorted(jobs):
        record = run.stored.get(job_id)
        if record is None or not record.state.terminal:
            report.lost += 1
            state = "missing" if record is None else record.state.value
            report.fail(f"job {job_id} ({jobs[job_id].kind}) lost: {state} at the deadline")
            continue
        job = _Job(record, jobs[job_id], runs.get(job_id, []), lines.get(job_id, []))
        _check_outcome(run, report, job)
        _check_executions(run, report, job)
    for job_id in runs:
        if job_id not in run.stored:
            report.fail(f"job {job_id}: executed, but no such job is stored")
    _check_zombies(run, report, runs, lines)
    _check_steps(run, report)
    return report


def _check_leases(run: Run, report: Report) -> None:
    seen = Counter((x.job, x.lease) for x in run.executions)
    for (job, lease), n in seen.items():
        if n > 1:
            report.fail(f"job {job}: lease {lease} ran its handler {n} times")
    for x in run.executions:
        if x.token is None:
            report.fail(f"job {x.job}: the recorder could not see its lease token ({x})")


def _check_groups(run: Run, report: Report) -> dict[str, Group]:
    """Map every stored job to its group; each group must own exactly one job (designed
    failures: one more per submit sent again, since a failed job frees its key)."""
    owned: dict[str, list[str]] = defaultdict(list)
    jobs: dict[str, Group] = {}
    for record in run.stored.values():
        name = record.meta.get("chaos") if record.meta else None
        group = run.groups.get(name) if isinstance(name, str) else None
        if group is None:
            report.fail(f"job {record.id} is stored but was never submitted ({record.meta})")
            continue
        owned[group.name].append(record.id)
        jobs[record.id] = group
    for group in run.groups.values():
        ids = owned.get(group.name, [])
        for job_id in group.acked - set(ids):
            jobs[job_id] = group  # acknowledged, yet not stored: lost
        if not group.acked:
            report.fail(f"group {group.name} ({group.kind}): no submit was acknowledged")
        allowed = 1 + (group.retried if group.designed_to_fail else 0)
        if len(ids) > allowed:
            report.fail(f"group {group.name} ({group.kind}): {len(ids)} jobs for one key: {ids}")
    return jobs


def _check_outcome(run: Run, report: Report, job: _Job) -> None:
    record, group = job.record, job.group
    where = f"job {record.id} ({group.kind})"
    if record.state != group.state:
        report.fail(f"{where}: {record.state.value}, expected {group.state}: {record.error}")
        return
    if group.state == "failed":
        error = record.error
        if error is None or error.type != group.error_type or error.step != group.error_step:
            report.fail(f"{where}: failed with {error}, expected {group.error_type}")
        return
    if record.id not in run.results:
        report.fail(f"{where}: its result could not be read")
        return
    got = run.results[record.id]
    if group.digest is not None:
        report.blobs_checked += 1
        data = got if isinstance(got, bytes) else b""
        digest = hashlib.sha256(data).hexdigest()
        if digest != group.digest or len(data) != group.size:
            report.fail(
                f"{where}: result of {len(data)} bytes, sha256 {digest[:12]}, expected "
                f"{group.size} bytes, sha256 {group.digest[:12]}"
            )
    elif group.steps is not None:
        steps = got.get("steps") if isinstance(got, dict) else None
        seen = {
            name: {"status": out.get("status"), "body": out.get("body")}
            for name, out in (steps or {}).items()
        }
        if seen != group.steps:
            report.fail(f"{where}: steps result {got}, expected {group.steps}")
    elif got != group.inline:
        report.fail(f"{where}: result {got!r}, expected {group.inline!r}")


def _check_executions(run: Run, report: Report, job: _Job) -> None:
    """Duplicates explained; the terminal line and the record are the last lease's."""
    for prev, cur in itertools.pairwise(job.runs):
        _classify(run, report, job, prev, cur)
    record = job.record
    where = f"job {record.id}"
    terminal = [ln for ln in job.lines if ln.event in TERMINAL_EVENTS]
    if len(terminal) > 1:
        shown = [(ln.pid, ln.event, ln.attempt) for ln in terminal]
        report.fail(f"{where}: {len(terminal)} terminal log lines: {shown}")
    if not terminal and not _line_cut_by_kill(run, job):
        report.fail(f"{where}: {record.state.value} without a terminal log line")
    if not job.runs:
        if record.handler != "arqd.steps":
            report.fail(f"{where}: {record.state.value} but its handler never ran")
        return
    last = job.runs[-1]
    if terminal and (terminal[0].pid, terminal[0].attempt) != (last.pid, last.attempt):
        report.fail(
            f"{where}: terminal line by pid {terminal[0].pid} attempt {terminal[0].attempt}, "
            f"but the last lease was pid {last.pid}'s, attempt {last.attempt}"
        )
    if record.attempts != last.attempt:
        report.fail(
            f"{where}: record says attempt {record.attempts}, last lease ran {last.attempt}"
        )
    ref = record.result
    if ref is not None and ref.name is not None and not ref.name.endswith(f"-{last.token}"):
        report.fail(f"{where}: result blob {ref.name} is not the last lease's ({last.token})")


def _classify(run: Run, report: Report, job: _Job, prev: Execution, cur: Execution) -> None:
    """``cur``'s lease followed ``prev``'s: a designed retry, or a duplicate to explain."""
    mine = [ln for ln in job.lines if ln.pid == prev.pid]
    retried = any(ln.event == "job.retrying" and ln.attempt == prev.attempt for ln in mine)
    if retried and prev.outcome == "raised":
        report.retries += 1
        return
    report.duplicates += 1
    if prev.start > cur.lease:
        report.stale.append(
            f"job {prev.job}: pid {prev.pid} started attempt {prev.attempt} at {prev.start:.3f} "
            f"on a lease of {prev.lease:.3f}, after the job was leased again at {cur.lease:.3f}"
        )
    slot = run.slots.get(prev.pid)
    causes = [d for d in run.disruptions if d.hits(prev.pid, slot, prev.lease, cur.lease)]
    dealt = [d for d in causes if d.kind in DEALT]
    noticed = any(ln.event == "job.lease_lost" and ln.t >= prev.lease for ln in mine)
    if retried and not any(d.kind in BACKEND_FAULTS for d in causes):
        report.fail(
            f"job {prev.job}: attempt {prev.attempt} on pid {prev.pid} failed unexpectedly "
            "(no designed failure, no backend fault)"
        )
    elif dealt or retried:
        report.explained += 1
    elif causes and noticed:
        report.explained += 1
        report.by_stall += 1
    else:
        report.fail(
            f"job {prev.job}: unexplained duplicate execution: attempt {cur.attempt} (lease "
            f"{cur.lease:.3f}, pid {cur.pid}) after attempt {prev.attempt} (lease "
            f"{prev.lease:.3f}, pid {prev.pid}, ran {prev.start:.3f}–{prev.end}, {prev.outcome});"
            f" nothing disrupted pid {prev.pid}"
            + ("" if noticed else " and it never logged the lease lost")
        )


def _line_cut_by_kill(run: Run, job: _Job) -> bool:
    """A job may lack its terminal line only if its daemon was killed right after the write."""
    finished = job.record.finished_at.timestamp() if job.record.finished_at else None
    if finished is None:
        return False
    for pid, (how, when) in run.ended.items():
        if how != "kill" or not finished - 1 <= when <= finished + MISSING_LINE_WINDOW:
            continue
        if not job.runs or job.runs[-1].pid == pid:
            return True
    return False


def _check_zombies(
    run: Run,
    report: Report,
    runs: Mapping[str, list[Execution]],
    lines: Mapping[str | None, list[Line]],
) -> None:
    """A paused daemon's executions taken over meanwhile: it must notice, and write nothing."""
    for pause in (d for d in run.disruptions if d.kind == "pause"):
        for job_id, job_runs in runs.items():
            mine = [ln for ln in lines.get(job_id, []) if ln.pid == pause.pid]
            for prev, cur in itertools.pairwise(job_runs):
                if _taken_over(run, pause, prev, cur, mine):
                    _check_zombie(run, report, pause, prev, mine)


def _taken_over(
    run: Run, pause: Disruption, prev: Execution, cur: Execution, mine: list[Line]
) -> bool:
    """Whether ``prev``'s lease, held by the paused daemon, went to ``cur`` because of the
    pause: leased elsewhere while the daemon was stopped (or before its first heartbeat after),
    the daemon neither killed nor stopping by then, and ``prev``'s own outcome not applied (a
    retry or release that landed before the pause — its answer possibly lost, so its line may
    come late — hands the job over legitimately)."""
    if prev.pid != pause.pid or cur.pid == pause.pid or not prev.start < pause.start:
        return False
    if not pause.start <= cur.lease <= pause.end + ZOMBIE_GRACE:
        return False
    how, when = run.ended.get(prev.pid, ("running", float("inf")))
    if how in ("kill", "term") and when <= cur.lease:
        return False
    handed = {"job.retrying", "job.released"}
    return not any(ln.attempt == prev.attempt and ln.event in handed for ln in mine)


def _check_zombie(
    run: Run, report: Report, pause: Disruption, ex: Execution, mine: list[Line]
) -> None:
    report.zombies += 1
    late = [ln for ln in mine if ln.attempt == ex.attempt and ln.event in TERMINAL_EVENTS]
    if late:
        report.fail(
            f"job {ex.job}: zombie pid {ex.pid} (paused {pause.start:.3f}–{pause.end:.3f}) "
            f"had its late outcome applied: {[(ln.event, ln.t) for ln in late]}"
        )
        return
    # Noticed at any time after this execution began: the takeover seen during this pause may
    # follow an unrecorded lease (leased, never started) after an earlier pause it noticed.
    if any(ln.event == "job.lease_lost" and ln.t >= ex.start for ln in mine):
        report.zombies_refused += 1
        return
    how, when = run.ended.get(ex.pid, ("running", float("inf")))
    if how == "kill" and when < pause.end + run.visibility_timeout + 2:
        report.zombies_refused += 1  # killed before it could look at its leases again
        return
    report.fail(f"job {ex.job}: zombie pid {ex.pid} never noticed it lost the lease")


def _check_steps(run: Run, report: Report) -> None:
    """Steps in order; a completed step repeated only when explained."""
    report.step_calls = len(run.calls)
    report.unattributed_calls = sum(1 for c in run.calls if c.pid is None)
    by_tag: dict[str, list[Call]] = defaultdict(list)
    for call in sorted(run.calls, key=lambda c: c.t):
        by_tag[call.tag].append(call)
    for tag, calls in by_tag.items():
        _check_step_order(report, tag, calls)
        for step in STEP_NAMES:
            done = [c for c in calls if c.step == step and c.status != 503]
            for prev, cur in itertools.pairwise(done):
                _check_step_repeat(run, report, tag, prev, cur)


def _check_step_repeat(run: Run, report: Report, tag: str, prev: Call, cur: Call) -> None:
    """A step completed twice: the daemon of either call must have been disrupted in between
    (the first call's daemon lost the job; or one of the calls came from a zombie that was
    stopped holding the job's lease and sent it, once resumed, before it noticed the lease was
    gone: hence the look back of one visibility timeout before the first call). A call whose
    daemon could not be told (it hung up before the service looked) may be explained by any
    disruption."""
    report.duplicates += 1
    since = prev.t - run.visibility_timeout
    for call in (prev, cur):
        slot = run.slots.get(call.pid) if call.pid is not None else None
        causes = [d for d in run.disruptions if d.hits(call.pid, slot, since, cur.t)]
        if any(d.kind in DEALT for d in causes):
            report.explained += 1
            return
        if causes:
            report.explained += 1
            report.by_stall += 1
            return
    report.fail(
        f"steps job {tag}: step {cur.step} repeated at {cur.t:.3f} (pid {cur.pid}) "
        f"after completing at {prev.t:.3f} (pid {prev.pid}), unexplained"
    )


def _check_step_order(report: Report, tag: str, calls: Iterable[Call]) -> None:
    passed: set[str] = set()
    for call in calls:
        index = STEP_NAMES.index(call.step)
        if index > 0 and STEP_NAMES[index - 1] not in passed:
            before = STEP_NAMES[index - 1]
            report.fail(f"steps job {tag}: {call.step} called before {before} passed")
        if call.status == 200:
            passed.add(call.step)
        if call.status == 400 and call.step == "pay":
            passed.discard("pay")
