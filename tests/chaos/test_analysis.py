"""The chaos verdict can fail: each rule of ``analysis.py``, fed a made-up run that breaks it,
reports a violation (and the same run without the fault passes). Fast: no daemons."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from arqd.model import ErrorInfo, Job, ResultRef, State

from .analysis import Disruption, Execution, Line, Report, Run, analyse
from .handlers import payload_bytes
from .workload import Call, Group

T = 1_000_000.0  # the made-up runs' clock
A, B = 101, 202  # two daemons' pids (slots 0 and 1)


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


@dataclass
class Scenario:
    """A made-up run, built up by the tests; ``verdict()`` analyses it."""

    backend: str = "sqlite"
    groups: dict[str, Group] = field(default_factory=dict)
    stored: dict[str, Job] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    executions: list[Execution] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    disruptions: list[Disruption] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    ended: dict[int, tuple[str, float]] = field(default_factory=dict)

    def job(
        self,
        job_id: str,
        kind: str = "noop",
        *,
        state: State = State.SUCCEEDED,
        attempts: int = 1,
        token: str = "aaaa0001",
        finished: float = T + 5,
    ) -> Job:
        """A stored job of a group of its own, acknowledged, with its expected result."""
        group = Group(job_id, kind, {}, acked={job_id}, inline={"n": job_id})
        result: ResultRef | None = None
        error = None
        if kind == "stream":
            group.digest = hashlib.sha256(payload_bytes(7, 100)).hexdigest()
            group.size = 100
            result = ResultRef(size=100, area="temporary", name=f"{job_id}-{token}")
            self.results[job_id] = payload_bytes(7, 100)
        elif kind == "fail":
            group.state, group.error_type = "failed", "Fail"
            error = ErrorInfo(type="Fail", message="designed", attempt=attempts)
        else:
            result = ResultRef(inline={"n": job_id})
            self.results[job_id] = {"n": job_id}
        self.groups[job_id] = group
        record = Job(
            id=job_id,
            queue="default",
            handler="chaos_work",
            state=state,
            attempts=attempts,
            created_at=at(T),
            ready_at=at(T),
            finished_at=at(finished) if state.terminal else None,
            result=result if state == State.SUCCEEDED else None,
            error=error,
            meta={"chaos": job_id},
        )
        self.stored[job_id] = record
        return record

    def ran(
        self,
        job_id: str,
        pid: int,
        lease: float,
        attempt: int = 1,
        *,
        token: str = "aaaa0001",
        end: float | None = 1.0,
        outcome: str = "ok",
    ) -> None:
        """An execution starting 0.1 s after its lease and lasting ``end`` seconds (None: it
        never completed)."""
        self.executions.append(
            Execution(
                job_id,
                attempt,
                lease,
                token,
                pid,
                lease + 0.1,
                None if end is None else lease + 0.1 + end,
                None if end is None else outcome,
            )
        )

    def log(self, pid: int, event: str, job_id: str, t: float, attempt: int | None = 1) -> None:
        self.lines.append(Line(pid, event, job_id, attempt, t))

    def verdict(self) -> Report:
        self.executions.sort(key=lambda x: (x.lease, x.start))
        return analyse(
            Run(
                backend=self.backend,
                visibility_timeout=2.0,
                groups=self.groups,
                stored=self.stored,
                results=self.results,
                executions=self.executions,
                lines=self.lines,
                disruptions=self.disruptions,
                calls=self.calls,
                slots={A: 0, B: 1},
                ended=self.ended,
            )
        )


def clean(s: Scenario, job_id: str = "j1", kind: str = "noop") -> None:
    """One job run once by daemon A and logged."""
    s.job(job_id, kind)
    s.ran(job_id, A, T)
    s.log(A, "job.succeeded", job_id, T + 1.2)


def takeover(s: Scenario, *, lost: bool = True) -> None:
    """Job j1's lease on A (at T) goes to B (at T + 3), which completes it as attempt 2."""
    s.job("j1", attempts=2, token="bbbb0002")
    s.ran("j1", A, T, end=None)
    s.ran("j1", B, T + 3, attempt=2, token="bbbb0002")
    s.log(B, "job.succeeded", "j1", T + 4.2, attempt=2)
    if lost:
        s.log(A, "job.lease_lost", "j1", T + 6, attempt=None)


def kill(pid: int, t: float) -> Disruption:
    return Disruption("kill", 0 if pid == A else 1, pid, t, t)


def test_a_clean_run_has_no_violation() -> None:
    """One job, one execution, one terminal line, the right result: nothing to report."""
    s = Scenario()
    clean(s)
    clean(s, "j2", "stream")
    report = s.verdict()
    assert report.violations == []
    assert (report.jobs, report.duplicates, report.lost, report.blobs_checked) == (2, 0, 0, 1)


def test_a_duplicate_after_a_kill_is_explained() -> None:
    """A's daemon killed while it held the lease: B's execution is an explained duplicate."""
    s = Scenario()
    takeover(s, lost=False)
    s.disruptions.append(kill(A, T + 1))
    report = s.verdict()
    assert report.violations == []
    assert (report.duplicates, report.explained, report.kills) == (1, 1, 1)


@pytest.mark.parametrize(
    "disruption",
    [
        None,
        Disruption("kill", 1, B, T + 1, T + 1),  # another daemon
        Disruption("kill", 0, A, T - 5, T - 5),  # before the lease
        Disruption("pause", 0, A, T + 3.5, T + 8),  # after the takeover
        Disruption("stall", 0, A, T + 1, T + 2.9),  # observed, but A never noticed a loss
    ],
)
def test_an_unexplained_duplicate_is_a_violation(disruption: Disruption | None) -> None:
    """A duplicate with nothing that disrupted the previous lease's daemon in between fails."""
    s = Scenario()
    takeover(s, lost=disruption is not None and disruption.kind != "stall")
    if disruption is not None:
        s.disruptions.append(disruption)
    report = s.verdict()
    assert any("unexplained duplicate" in v for v in report.violations), report.violations
    assert report.explained == 0


def test_an_observed_stall_explains_a_lease_the_daemon_saw_lost() -> None:
    """A stalled daemon that logged the lease lost explains the duplicate (counted apart)."""
    s = Scenario()
    takeover(s)
    s.disruptions.append(Disruption("stall", 0, A, T + 1, T + 2.9))
    report = s.verdict()
    assert report.violations == []
    assert (report.explained, report.by_stall) == (1, 1)


def test_a_sqlite_lock_holding_pause_explains_every_daemons_duplicates() -> None:
    """A pause of B holding the write lock stalls A too; a plain pause of B does not."""
    for stalls_all in (True, False):
        s = Scenario()
        takeover(s)
        s.disruptions.append(Disruption("pause", 1, B, T + 0.5, T + 2.5, stalls_all=stalls_all))
        assert (s.verdict().violations == []) is stalls_all


@pytest.mark.parametrize("kind", ["server_restart", "server_pause"])
def test_the_database_servers_chaos_explains_every_daemons_duplicates(kind: str) -> None:
    """A restart or freeze of the database server during A's lease explains B's takeover as
    dealt chaos (whether or not A noticed), and is counted; one over before the lease does not."""
    for start, explains in ((T + 0.5, True), (T - 5, False)):
        s = Scenario(backend="postgres")
        takeover(s, lost=False)
        s.disruptions.append(Disruption(kind, -1, None, start, start + 2, stalls_all=True))
        report = s.verdict()
        assert (report.violations == []) is explains, report.violations
        if explains:
            assert (report.explained, report.by_stall) == (1, 0)
        restarts, pauses = report.server_restarts, report.server_pauses
        assert (restarts, pauses) == ((1, 0) if kind == "server_restart" else (0, 1))


def test_a_database_server_restart_may_fail_an_attempt() -> None:
    """An attempt not designed to fail may fail while the server restarts (a backend fault),
    but not outside one."""
    for restarted in (True, False):
        s = Scenario(backend="postgres")
        s.job("j1", attempts=2, token="bbbb0002")
        s.ran("j1", A, T)
        s.log(A, "job.retrying", "j1", T + 1.2)
        s.ran("j1", A, T + 2, attempt=2, token="bbbb0002")
        s.log(A, "job.succeeded", "j1", T + 3.2, attempt=2)
        if restarted:
            s.disruptions.append(Disruption("server_restart", -1, None, T + 0.5, T + 1.5, True))
        assert (s.verdict().violations == []) is restarted


def test_a_lease_that_runs_its_handler_twice_is_a_violation() -> None:
    """Two starts under one lease break at-most-once per lease."""
    s = Scenario()
    clean(s)
    s.ran("j1", A, T)
    assert any("ran its handler 2 times" in v for v in s.verdict().violations)


def test_two_terminal_lines_are_a_violation() -> None:
    """A job finished twice (two canonical terminal lines) fails."""
    s = Scenario()
    clean(s)
    s.log(B, "job.succeeded", "j1", T + 3)
    assert any("2 terminal log lines" in v for v in s.verdict().violations)


def test_a_terminal_line_from_a_superseded_lease_is_a_violation() -> None:
    """The zombie's outcome applied instead of the last lease's: wrong pid and attempt."""
    s = Scenario()
    takeover(s)
    s.disruptions.append(kill(A, T + 1))
    s.lines = [ln for ln in s.lines if ln.event != "job.succeeded"]
    s.log(A, "job.succeeded", "j1", T + 5, attempt=1)
    violations = s.verdict().violations
    assert any("but the last lease was pid" in v for v in violations), violations


def test_a_record_that_is_not_the_last_lease_is_a_violation() -> None:
    """The stored attempt and the result blob's lease must be the last lease's."""
    s = Scenario()
    s.job("j1", "stream", attempts=1, token="aaaa0001")
    s.ran("j1", A, T, token="aaaa0001", end=None)
    s.ran("j1", B, T + 3, attempt=2, token="bbbb0002")
    s.log(B, "job.succeeded", "j1", T + 4.2, attempt=2)
    s.disruptions.append(kill(A, T + 1))
    violations = s.verdict().violations
    assert any("record says attempt 1" in v for v in violations), violations
    assert any("is not the last lease's" in v for v in violations), violations


def test_a_missing_terminal_line_is_excused_only_by_a_kill_right_after_the_write() -> None:
    """No terminal line: fine if the daemon died just after finishing, a violation if not."""
    for killed in (True, False):
        s = Scenario()
        s.job("j1", finished=T + 1.1)
        s.ran("j1", A, T)
        if killed:
            s.ended[A] = ("kill", T + 1.3)
        assert (s.verdict().violations == []) is killed


def test_a_job_not_terminal_at_the_deadline_is_lost() -> None:
    """A job still running, or acknowledged but not stored, is lost."""
    s = Scenario()
    s.job("j1", state=State.RUNNING)
    s.groups["j2"] = Group("j2", "noop", {}, acked={"j2"})
    report = s.verdict()
    assert report.lost == 2
    assert len([v for v in report.violations if "lost" in v]) == 2


def test_a_wrong_result_is_a_violation() -> None:
    """A blob whose checksum differs, or an inline result that differs, fails."""
    s = Scenario()
    clean(s, "j1", "stream")
    clean(s, "j2")
    s.results["j1"] = b"\0" + s.results["j1"][1:]
    s.results["j2"] = {"n": "other"}
    violations = s.verdict().violations
    assert any("sha256" in v for v in violations), violations
    assert any("result {'n': 'other'}" in v for v in violations), violations


def test_a_job_in_the_wrong_state_is_a_violation() -> None:
    """A designed failure that succeeded, and a job that failed undesigned, both fail."""
    s = Scenario()
    s.job("j1", "fail", state=State.SUCCEEDED)
    s.ran("j1", A, T)
    s.log(A, "job.succeeded", "j1", T + 1.2)
    s.job("j2", state=State.FAILED)
    s.ran("j2", B, T)
    s.log(B, "job.failed", "j2", T + 1.2)
    violations = s.verdict().violations
    assert any("succeeded, expected failed" in v for v in violations), violations
    assert any("failed, expected succeeded" in v for v in violations), violations


def test_two_jobs_for_one_key_and_unknown_jobs_are_violations() -> None:
    """The submits of one key must land on one job; no job may appear from nowhere."""
    s = Scenario()
    clean(s)
    twin = s.job("j1b")
    del s.groups["j1b"]
    s.stored["j1b"] = Job(**{**_fields(twin), "meta": {"chaos": "j1"}})
    s.ran("j1b", B, T)
    s.log(B, "job.succeeded", "j1b", T + 1.2)
    s.stored["stray"] = Job(**{**_fields(twin), "id": "stray", "meta": {}})
    violations = s.verdict().violations
    assert any("2 jobs for one key" in v for v in violations), violations
    assert any("never submitted" in v for v in violations), violations


def _fields(job: Job) -> dict[str, Any]:
    return {f: getattr(job, f) for f in job.__struct_fields__}


def test_an_undesigned_failed_attempt_is_a_violation() -> None:
    """A retry after an attempt that was not designed to fail needs an injected fault."""
    s = Scenario()
    s.job("j1", attempts=2, token="bbbb0002")
    s.ran("j1", A, T)
    s.log(A, "job.retrying", "j1", T + 1.2)
    s.ran("j1", A, T + 2, attempt=2, token="bbbb0002")
    s.log(A, "job.succeeded", "j1", T + 3.2, attempt=2)
    assert any("failed unexpectedly" in v for v in s.verdict().violations)
    s.executions[0] = Execution("j1", 1, T, "aaaa0001", A, T + 0.1, T + 0.2, "raised")
    report = s.verdict()
    assert report.violations == [] and report.retries == 1 and report.duplicates == 0


def test_a_zombie_must_notice_and_must_not_finish() -> None:
    """A paused daemon whose lease was taken over logs the loss and gets no outcome applied."""
    pause = Disruption("pause", 0, A, T + 0.5, T + 4)
    s = Scenario()
    takeover(s, lost=False)
    s.disruptions.append(pause)
    report = s.verdict()
    assert any("never noticed" in v for v in report.violations), report.violations
    s.log(A, "job.lease_lost", "j1", T + 4.1, attempt=None)
    report = s.verdict()
    assert report.violations == [] and (report.zombies, report.zombies_refused) == (1, 1)
    s.log(A, "job.succeeded", "j1", T + 4.2, attempt=1)
    assert any("late outcome applied" in v for v in s.verdict().violations)


def test_a_zombie_that_noticed_before_a_later_pause_is_refused() -> None:
    """Found by a 10-minute soak: A is paused, loses j1's lease and says so; an unrecorded
    attempt (leased, never started: its daemon was killed) intervenes; A is paused again while
    B takes the job over. A noticed its loss before the second pause: no violation."""
    s = Scenario()
    s.job("j1", attempts=3, token="cccc0003")
    s.ran("j1", A, T, end=None)
    s.disruptions.append(Disruption("pause", 0, A, T + 0.5, T + 4))
    s.log(A, "job.lease_lost", "j1", T + 4.1, attempt=None)
    s.disruptions.append(Disruption("pause", 0, A, T + 5, T + 8))
    s.ran("j1", B, T + 5.5, attempt=3, token="cccc0003")
    s.log(B, "job.succeeded", "j1", T + 6.7, attempt=3)
    report = s.verdict()
    assert not any("never noticed" in v for v in report.violations), report.violations


def test_a_stale_run_is_counted() -> None:
    """A handler started after its job was leased again is counted as a stale run."""
    s = Scenario()
    takeover(s)
    s.disruptions.append(Disruption("pause", 0, A, T + 0.05, T + 3.5))
    s.executions[0] = Execution("j1", 1, T, "aaaa0001", A, T + 3.6, T + 3.7, "ok")
    s.log(A, "job.lease_lost", "j1", T + 3.8, attempt=None)
    report = s.verdict()
    assert report.violations == [] and len(report.stale) == 1


def test_steps_out_of_order_or_repeated_unexplained_are_violations() -> None:
    """Steps are called in order, and a completed step repeats only when explained."""
    s = Scenario()
    s.calls = [
        Call("t1", "reserve", T, 200, A),
        Call("t1", "pay", T + 1, 200, A),
        Call("t1", "pay", T + 9, 200, B),
        Call("t2", "pay", T, 200, A),
    ]
    report = s.verdict()
    assert any("step pay repeated" in v for v in report.violations), report.violations
    assert any("pay called before reserve" in v for v in report.violations), report.violations
    s.disruptions.append(kill(A, T + 2))
    report = s.verdict()
    assert not any("repeated" in v for v in report.violations)
    assert (report.duplicates, report.explained) == (1, 1)
