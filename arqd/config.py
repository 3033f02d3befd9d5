"""``config.toml``: the schema, loading, validation and environment overrides; every setting is
described in docs/configuration.md.

Every section is a frozen msgspec Struct that rejects unknown keys, so a typo is an error rather
than a silently ignored setting. Durations are strings such as ``"500ms"``, ``"30s"``, ``"5m"``,
``"24h"`` (or plain numbers of seconds); sizes are ``"64KiB"``, ``"1MiB"`` (or plain bytes).
``ARQD_<SECTION>_<KEY>`` environment variables override file settings (and reach tables inside
a section: ``ARQD_DEFAULTS_BACKOFF_BASE``); their values are read as TOML values when they parse
as such (``64``, ``true``, ``["a", "b"]``) and as strings otherwise.

Validation visits every section, table entry and list item on its own and gathers every problem,
so one run names them all, each as ``<source>: <setting>: <reason>``: the source is the
``ARQD_*`` variable the value came from, else the file. A config that would leave the daemon
doing nothing (no queue to lease from, a token with no scope, a zero timeout, a cron that never
fires, a group every trigger would refuse) is refused like a malformed one, so start, reload and
``arqd check-config`` all refuse it.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from arqd.errors import ConfigError, InvalidRequest
from arqd.model import (
    GROUP_MAX,
    META_MAX,
    NAME_PATTERN,
    SCHEDULE_KEY,
    Attempts,
    GroupMemberSpec,
    Key,
    MemberName,
    QueueName,
    member_names,
    where_and_why,
)
from arqd.stepmodel import (
    STEPS_HANDLER,
    is_fernet_key,
    parse_allow_hosts,
    parse_credentials,
    parse_steps,
)

__all__ = [
    "Config",
    "Problem",
    "load_config",
    "parse_duration",
    "parse_size",
    "validate_config",
]


class Duration(float):
    """Seconds, written in config as ``"30s"``."""


class PositiveDuration(Duration):
    """A duration that must be more than zero (a zero timeout or interval stops all work)."""


class Size(int):
    """Bytes, written in config as ``"64KiB"``."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*\Z")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "30s", got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(
            f'expected a duration such as "500ms", "30s", "5m" or "24h", got {value!r}'
        )
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'expected a size such as "64KiB" or "1MiB", got {value!r}')


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is PositiveDuration:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError(f"must be more than 0, got {value!r}")
        return PositiveDuration(seconds)
    if kind is Duration:
        return Duration(parse_duration(value))
    if kind is Size:
        return Size(parse_size(value))
    raise NotImplementedError(kind)


Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
_NAME = re.compile(NAME_PATTERN)
Scope = Literal["submit", "read", "cancel", "admin"]
SCOPES: tuple[Scope, ...] = typing.get_args(Scope)  # a token's scopes; ``admin`` implies the rest
# Lists where an empty one would leave the daemon doing nothing are refused when empty
# (workers.queues: nothing leased; a token's scopes: nothing allowed).
NON_EMPTY = msgspec.Meta(min_length=1)
# A host name of server.allowed_hosts (compared without port, case-insensitively).
HostName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,253}\Z")]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Config tables are immutable and reject unknown keys; subclasses inherit both.

    A ``__post_init__`` check raises ``ValueError("<field>: <reason>")`` so that the problem is
    reported against that field."""


class ServerConfig(_Section, frozen=True):
    listen: str = "127.0.0.1:8080"
    max_body: Size = Size(1024**2)
    allow_anonymous: bool = False
    allowed_hosts: list[HostName] = msgspec.field(default_factory=list)
    # Bytes of job JSON the status-poll cache keeps (arqd/http/cache.py); 0 turns it off.
    status_cache: Size = Size(16 * 1024**2)
    # Long-polls (``?wait=``) and event streams open at once; beyond, 429 with Retry-After.
    max_held: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


# ``queue.backend`` / ``results.backend``: a built-in's name, or a class by import path
# (loaded and checked by ``arqd.stores``; config.py imports nothing above the model).
PLUGGED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")


def _check_backend(backend: str, options: Mapping[str, Any], builtins: tuple[str, ...]) -> None:
    if backend in builtins:
        if options:
            raise ValueError(f"options: only a plugged backend takes options, not {backend}")
        return
    if not PLUGGED.match(backend):
        names = ", ".join(map(repr, builtins))
        raise ValueError(f'backend: expected {names} or "package.module:Class", got {backend!r}')


class _Plugged(_Section, frozen=True):
    """A section naming a backend; ``options`` are a plugged class's own settings."""

    backend: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)

    def __repr__(self) -> str:  # a plugin's options may hold secrets: names only
        fields = (f for f in self.__struct_fields__ if f != "options")
        shown = ", ".join(
            f"{f}={redact_dsn(v) if f in ('dsn', 'url') and v else v!r}"
            for f, v in ((f, getattr(self, f)) for f in fields)
        )
        return f"{type(self).__name__}({shown}, options=[{', '.join(map(repr, self.options))}])"


QUEUE_BACKENDS = ("memory", "sqlite", "dynamodb", "postgres", "redis")
RESULT_BACKENDS = ("memory", "files", "s3")
PG_SCHEMA = r"^[a-z_][a-z0-9_]{0,62}\Z"  # a plain identifier: never quoted wrongly


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def redact_dsn(dsn: str) -> str:
    """A database URL (postgres, redis) or keyword DSN without its password, for logs, errors
    and reprs."""
    # Up to the last "@" of the authority, as the drivers split it: a password may hold an "@".
    dsn = re.sub(r"(://[^:/@]*:)[^/?#]*@", r"\1[redacted]@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1[redacted]", dsn, flags=re.I)


class QueueConfig(_Plugged, frozen=True):
    backend: str = "sqlite"
    path: str = "var/arqd.sqlite3"
    synchronous: Literal["normal", "full"] = "normal"
    table: str = "arqd"
    region: str | None = None
    endpoint_url: str | None = None
    shards: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    # postgres (docs/postgres.md): the DSN (also ARQD_QUEUE_DSN; its password is never logged),
    # the schema arqd's tables live in, the pool's connections, each statement's time limit.
    dsn: str | None = None
    schema: Annotated[str, msgspec.Meta(pattern=PG_SCHEMA)] = "arqd"
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    statement_timeout: PositiveDuration = PositiveDuration(10)
    migrate: bool = True  # create or migrate the schema on open; false: `arqd init-db` does
    # redis (docs/redis.md): the server's URL (also ARQD_QUEUE_URL; its password is never
    # logged) and the prefix (hash tag) of every key; pool_size and statement_timeout as above.
    url: str | None = None
    prefix: Name = "arqd"

    def __post_init__(self) -> None:
        _check_backend(self.backend, self.options, QUEUE_BACKENDS)
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("dsn: the postgres backend needs one (or ARQD_QUEUE_DSN)")
        if self.backend == "redis":
            if not self.url:
                raise ValueError("url: the redis backend needs one (or ARQD_QUEUE_URL)")
            if not self.url.startswith(REDIS_SCHEMES):
                raise ValueError(
                    f"url: redis://, rediss:// (TLS) or unix:// (a socket), got"
                    f" {redact_dsn(self.url)!r}"
                )


class ResultsConfig(_Plugged, frozen=True):
    backend: str = "files"
    path: str = "var/results"
    bucket: str = "arqd-results"
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    temporary_ttl: PositiveDuration = PositiveDuration(24 * 3600)
    inline_max: Size = Size(64 * 1024)

    def __post_init__(self) -> None:
        _check_backend(self.backend, self.options, RESULT_BACKENDS)


class WorkersConfig(_Section, frozen=True):
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 32
    queues: Annotated[list[QueueName], NON_EMPTY] = msgspec.field(
        default_factory=lambda: ["default"]
    )
    visibility_timeout: Duration = Duration(30)
    shutdown_grace: Duration = Duration(30)
    heartbeat: PositiveDuration | None = None  # default: a third of visibility_timeout, ≤ 2 s
    batch: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    poll_max: PositiveDuration = PositiveDuration(0.5)

    def __post_init__(self) -> None:
        if not self.queues:  # loading checks NON_EMPTY; this catches a struct built in code
            raise ValueError("queues: must not be empty")
        if self.visibility_timeout < 1:
            raise ValueError("visibility_timeout: must be at least 1s")
        if self.heartbeat is not None and self.heartbeat >= self.visibility_timeout:
            raise ValueError("heartbeat: must be shorter than visibility_timeout")

    @property
    def heartbeat_interval(self) -> float:
        if self.heartbeat is not None:
            return float(self.heartbeat)
        return min(self.visibility_timeout / 3, 2.0)


class BackoffConfig(_Section, frozen=True):
    base: Duration = Duration(1)
    factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    max: Duration = Duration(600)
    jitter: bool = True


class DefaultsConfig(_Section, frozen=True):
    max_attempts: Attempts = 5
    timeout: PositiveDuration = PositiveDuration(300)
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)


class HandlerConfig(_Section, frozen=True):
    short_form: ClassVar[str] = "call"  # ``name = "module:function"`` is ``{ call = ... }``

    call: str
    timeout: PositiveDuration | None = None
    max_attempts: Attempts | None = None
    cache: bool = False
    sticky: bool = False
    queue: QueueName | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^[\w.]+:[\w.]+\Z", self.call):
            raise ValueError(f'call: must be "module:function", got {self.call!r}')


class GroupJob(_Section, frozen=True):
    """A job of a configured group: a handler and its payload, or multi-step HTTP ``steps``
    (with optional ``credentials``), as a submitted job spec."""

    handler: str | None = None
    steps: list[dict[str, Any]] | None = None
    credentials: dict[str, str] | None = None
    name: MemberName | None = None
    payload: Any = None
    queue: QueueName | None = None
    key: Key | None = None
    sticky: bool = False
    max_attempts: Attempts | None = None
    timeout: PositiveDuration | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.steps is None):
            raise ValueError("handler: a job needs a handler or steps (one of them)")
        if self.steps is not None and self.payload is not None:
            raise ValueError("payload: a multi-step job takes none (its steps carry bodies)")
        if self.steps is None and self.credentials is not None:
            raise ValueError("credentials: only multi-step HTTP jobs take credentials")

    def spec(self) -> GroupMemberSpec:
        """The job spec a trigger submits."""
        return GroupMemberSpec(
            handler=self.handler,
            steps=self.steps,
            credentials=self.credentials,
            name=self.name,
            payload=self.payload,
            queue=self.queue,
            key=self.key,
            sticky=self.sticky,
            max_attempts=self.max_attempts,
            timeout=None if self.timeout is None else float(self.timeout),
            meta=self.meta,
        )


class GroupConfig(_Section, frozen=True):
    jobs: list[GroupJob]

    def __post_init__(self) -> None:
        if not 1 <= len(self.jobs) <= GROUP_MAX:
            raise ValueError(f"jobs: a group holds 1 to {GROUP_MAX} jobs")


class ScheduleConfig(_Section, frozen=True):
    name: Name
    handler: str
    cron: str | None = None
    # How a 6-field ``cron`` is read: seconds "first" (Quartz's order) or "last" (croniter's).
    cron_seconds: Literal["first", "last"] | None = None
    every: Duration | None = None
    payload: Any = None
    queue: QueueName | None = None
    timezone: str = "UTC"
    catch_up: Literal["none", "last"] = "none"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r} needs exactly one of cron or every")

    @property
    def seconds_first(self) -> bool:
        """Whether a 6-field ``cron`` has its seconds field first (else last)."""
        return self.cron_seconds == "first"


class TokenConfig(_Section, frozen=True):
    name: Name
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
    scopes: Annotated[list[Scope], NON_EMPTY]

    def __post_init__(self) -> None:
        if not self.scopes:  # loading checks NON_EMPTY; this catches a struct built in code
            raise ValueError("scopes: must not be empty")


class AuthConfig(_Section, frozen=True):
    tokens: list[TokenConfig] = msgspec.field(default_factory=list)


class HttpStepsConfig(_Section, frozen=True):
    allow_hosts: list[str] = msgspec.field(default_factory=list)
    # Step secrets are stored sealed with Fernet keys: ``keys`` (seal with the first, open with
    # any: rotation; a list, or one string of comma-separated keys as ARQD_HTTP_STEPS_KEYS may
    # give it), or the single ``key``, or else the file ``key_file`` (default: ``steps.key``
    # beside the sqlite database), made on first use. Every daemon sharing a queue needs the
    # same keys; a queue shared by several hosts needs ``keys`` or ``key`` (arqd.steps).
    keys: list[str] | str = msgspec.field(default_factory=list)
    key: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if self.key is not None and self.key_list:
            raise ValueError("set keys or key, not both")
        if self.key is not None and not is_fernet_key(self.key):
            raise ValueError(f"key: {_NOT_A_KEY}")
        for index, key in enumerate(self.key_list):
            if not is_fernet_key(key):
                raise ValueError(f"keys[{index}]: {_NOT_A_KEY}")

    @property
    def key_list(self) -> list[str]:
        """``keys`` as a list (a string is split at commas; Fernet keys never hold one)."""
        if isinstance(self.keys, str):
            return [k.strip() for k in self.keys.split(",") if k.strip()]
        return list(self.keys)

    def __repr__(self) -> str:  # keys never reach a log line or a traceback
        hidden = "[redacted]"
        return (
            f"HttpStepsConfig(allow_hosts={self.allow_hosts!r},"
            f" keys={[hidden] * len(self.key_list)!r},"
            f" key={None if self.key is None else hidden!r}, key_file={self.key_file!r})"
        )


_NOT_A_KEY = "not a Fernet key (44 characters of url-safe base64 encoding 32 bytes)"


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


class Config(_Section, frozen=True):
    """The whole configuration; ``Config()`` is the built-in default (sqlite + files)."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    results: ResultsConfig = msgspec.field(default_factory=ResultsConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    defaults: DefaultsConfig = msgspec.field(default_factory=DefaultsConfig)
    handlers: dict[str, str | HandlerConfig] = msgspec.field(default_factory=dict)
    groups: dict[str, GroupConfig] = msgspec.field(default_factory=dict)
    schedules: list[ScheduleConfig] = msgspec.field(default_factory=list)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    http_steps: HttpStepsConfig = msgspec.field(default_factory=HttpStepsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    # Not settings: where the config came from, and which settings ARQD_* variables set
    # (setting path -> variable name), so that an error names its true source.
    source: str = "<defaults>"
    origins: dict[str, str] = msgspec.field(default_factory=dict)

    def handler_configs(self) -> dict[str, HandlerConfig]:
        """Every handler in its long form."""
        return {
            name: HandlerConfig(call=h) if isinstance(h, str) else h
            for name, h in self.handlers.items()
        }

    def problem(self, setting: str, reason: str) -> str:
        """``<source>: <setting>: <reason>``, naming the ``ARQD_*`` variable that set
        ``setting`` (or a table holding it) if one did, else the file."""
        return str(Problem(_origin(setting, self.origins, self.source), setting, reason))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Config:
        cfg, problems = _validate(data, source, {})
        if problems:
            raise ConfigError("\n".join(map(str, problems)))
        return cfg


_NOT_SETTINGS = frozenset({"source", "origins"})


# --- validation -----------------------------------------------------------------------------------


class Problem(NamedTuple):
    """One reason a config is refused."""

    source: str  # the file, or the ARQD_* variable the value came from
    setting: str  # e.g. "workers.queues", "handlers.report.call"; empty for the whole file
    reason: str

    def __str__(self) -> str:
        reason = " ".join(self.reason.splitlines())  # one line per problem, always
        return (
            f"{self.source}: {self.setting}: {reason}"
            if self.setting
            else f"{self.source}: {reason}"
        )


def _origin(setting: str, origins: Mapping[str, str], default: str) -> str:
    """The variable that set ``setting`` or a table above it (the longest match), or ``default``."""
    best = ""
    for key in origins:
        if (setting == key or setting.startswith((key + ".", key + "["))) and len(key) > len(best):
            best = key
    return origins[best] if best else default


class _Invalid:
    """A value that failed validation (its problems are already recorded)."""


_INVALID = _Invalid()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _section_of(tp: Any) -> type[_Section] | None:
    """The config section a field holds: the type itself, or the section in a union."""
    if isinstance(tp, type) and issubclass(tp, _Section):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and issubclass(arg, _Section):
                return arg
    return None


def _fields(cls: type[_Section]) -> dict[str, Any]:
    return {f.name: f for f in msgspec.structs.fields(cls) if f.name not in _NOT_SETTINGS}


class _Checker:
    """Converts a raw config table piece by piece, recording every problem it meets."""

    def __init__(self, source: str, origins: Mapping[str, str]) -> None:
        self.source = source
        self.origins = origins
        self.problems: list[Problem] = []

    def add(self, setting: str, reason: str) -> None:
        where = _origin(setting, self.origins, self.source)
        self.problems.append(Problem(where, setting or "(top level)", reason))

    def config(self, data: Mapping[str, Any]) -> Config:
        """The config with every valid section; an invalid section is left at its default."""
        fields = _fields(Config)
        sections: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                self.add(str(key), "unknown setting")
                continue
            converted = self.value(fields[key].type, value, key)
            if converted is not _INVALID:
                sections[key] = converted
        return Config(**sections, source=self.source, origins=dict(self.origins))

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        section = _section_of(tp)
        if section is not None and isinstance(raw, Mapping):
            return self.section(section, raw, path)
        if section is not None and isinstance(raw, str) and hasattr(section, "short_form"):
            return self.section(section, {section.short_form: raw}, path)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and isinstance(raw, list) and _section_of(args[0]):
            return self.items(args[0], raw, path)
        if typing.get_origin(tp) is dict and isinstance(raw, Mapping) and _section_of(args[1]):
            return {
                name: converted
                for name, value in raw.items()
                if (converted := self.value(args[1], value, _join(path, str(name)))) is not _INVALID
            }  # a table of named tables (handlers, groups): an invalid entry is left out
        try:
            return msgspec.convert(raw, tp, dec_hook=_dec_hook, strict=False)
        except msgspec.ValidationError as exc:
            inner, reason = where_and_why(exc)
            self.add(path + inner if inner.startswith("[") else _join(path, inner), reason)
            return _INVALID

    def section(self, cls: type[_Section], raw: Mapping[str, Any], path: str) -> Any:
        fields = _fields(cls)
        values: dict[str, Any] = {}
        valid = True
        for key, value in raw.items():
            field = fields.get(key)
            if field is None:
                self.add(_join(path, str(key)), "unknown setting")
                valid = False
                continue
            converted = self.value(field.type, value, _join(path, key))
            valid = valid and converted is not _INVALID
            values[key] = converted
        for name in fields.keys() - raw.keys():
            if fields[name].required:
                self.add(_join(path, name), "missing (this setting is required)")
                valid = False
        if not valid:
            return _INVALID
        try:
            return cls(**values)
        except ValueError as exc:
            field, colon, reason = str(exc).partition(": ")
            if colon and field in fields:
                self.add(_join(path, field), reason)
            else:
                self.add(path, str(exc))
            return _INVALID

    def items(self, cls: type[_Section], raw: list[Any], path: str) -> Any:
        """A list of tables. Items with a required ``name`` (schedules, tokens) are named by it
        and an invalid one is dropped; other items are named by position, and one invalid item
        invalidates the list (its neighbours' positions carry meaning: default names)."""
        fields = _fields(cls)
        named = "name" in fields and fields["name"].required
        out = []
        for i, item in enumerate(raw):
            name = item.get("name") if isinstance(item, Mapping) and named else None
            ok = isinstance(name, str) and _NAME.match(name)
            label = f"{path}.{name}" if ok else f"{path}[{i}]"
            converted = self.value(cls, item, label)
            if converted is not _INVALID:
                out.append(converted)
        return out if named or len(out) == len(raw) else _INVALID


# --- checks across settings -----------------------------------------------------------------------


def _check_references(cfg: Config, data: Mapping[str, Any], checker: _Checker) -> None:
    """What no single table can check: handler names, group members, schedules, allow_hosts.
    Handler names include invalid entries (already reported), so they add no second error."""
    raw = data.get("handlers")
    handlers = set(raw) if isinstance(raw, Mapping) else set()
    handlers |= set(cfg.handlers) | {STEPS_HANDLER}
    for name, group in cfg.groups.items():
        _check_group(f"groups.{name}", group, handlers, checker)
    seen: set[str] = set()
    for sched in cfg.schedules:
        path = f"schedules.{sched.name}"
        if sched.name in seen:
            checker.add(f"{path}.name", "another schedule has this name")
        seen.add(sched.name)
        if sched.handler not in handlers:
            checker.add(f"{path}.handler", f"unknown handler {sched.handler!r}")
        for setting, reason in _schedule_problems(sched):
            checker.add(f"{path}.{setting}", reason)
    _check_allow_hosts(cfg, checker)


def _check_group(path: str, group: GroupConfig, handlers: set[str], checker: _Checker) -> None:
    """Everything a trigger would refuse with a 422, found when the config loads instead."""
    names = member_names([job.name for job in group.jobs])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        checker.add(
            f"{path}.jobs",
            f"more than one job is named {', '.join(map(repr, twice))}; names within a group "
            "must be unique (a job without a name is job1, job2... by its position)",
        )
    for i, job in enumerate(group.jobs):
        where = f"{path}.jobs[{i}]"
        if job.handler is not None and job.handler not in handlers:
            checker.add(f"{where}.handler", f"unknown handler {job.handler!r}")
        if job.key is not None and job.key.startswith(SCHEDULE_KEY):
            checker.add(f"{where}.key", f"the {SCHEDULE_KEY!r} prefix is reserved for schedules")
        if job.meta and len(msgspec.json.encode(job.meta)) > META_MAX:
            checker.add(f"{where}.meta", f"at most {META_MAX} bytes of JSON")
        if job.steps is not None:
            try:
                parse_steps(job.steps)
                parse_credentials(job.credentials)
            except InvalidRequest as exc:
                checker.add(where, str(exc))


_CRON_FIELDS = ("minute", "hour", "day", "month", "weekday")


def _schedule_problems(sched: ScheduleConfig) -> list[tuple[str, str]]:
    """(setting, reason) for each reason ``sched`` cannot run."""
    problems: list[tuple[str, str]] = []
    zone: ZoneInfo | None = None
    try:
        zone = ZoneInfo(sched.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(("timezone", f"unknown time zone {sched.timezone!r}"))
    if sched.every is not None and sched.every < 1:
        problems.append(("every", "at least 1s"))
    if sched.cron is not None:
        problems += _cron_problems(sched, zone or ZoneInfo("UTC"))
    elif sched.cron_seconds is not None:
        problems.append(("cron_seconds", "only a 6-field cron has a seconds field"))
    return problems


def _cron_problems(sched: ScheduleConfig, zone: ZoneInfo) -> list[tuple[str, str]]:
    cron = sched.cron or ""
    fields = cron.split()
    if len(fields) not in (5, 6):
        return [("cron", f"not a 5- or 6-field cron expression: {cron!r}")]
    if len(fields) == 5 and sched.cron_seconds is not None:
        return [("cron_seconds", "only a 6-field cron has a seconds field")]
    if len(fields) == 6 and sched.cron_seconds is None:
        first = " ".join(f"{n}={v}" for n, v in zip(("second", *_CRON_FIELDS), fields, strict=True))
        last = " ".join(f"{n}={v}" for n, v in zip((*_CRON_FIELDS, "second"), fields, strict=True))
        return [
            (
                "cron",
                f"{cron!r} has 6 fields, which read two ways: with the seconds first "
                f"as {first}, or with the seconds last (croniter's order) as {last}; say which "
                'with cron_seconds = "first" or "last"',
            )
        ]
    if not croniter.is_valid(cron, second_at_beginning=sched.seconds_first):
        return [("cron", f"not a valid cron expression: {cron!r}")]
    try:
        ticks = croniter(cron, datetime.now(zone), second_at_beginning=sched.seconds_first)
        ticks.get_next(float)
        ticks.get_prev(float)
    except ValueError:  # croniter's CroniterBadDateError: no such date in the next 50 years
        return [("cron", f"{cron!r} never fires (no such date)")]
    return []


def _check_allow_hosts(cfg: Config, checker: _Checker) -> None:
    try:
        parse_allow_hosts(cfg.http_steps.allow_hosts)
    except ValueError as exc:
        checker.add("http_steps.allow_hosts", str(exc).removeprefix("allow_hosts: "))


def _validate(
    data: Mapping[str, Any], source: str, origins: Mapping[str, str]
) -> tuple[Config, list[Problem]]:
    checker = _Checker(source, origins)
    cfg = checker.config(data)
    _check_references(cfg, data, checker)
    return cfg, checker.problems


# --- the environment ------------------------------------------------------------------------------


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_setting(rest: str) -> list[str] | None:
    """The setting path that ``ARQD_<REST>`` names (``rest`` lowercased), walking sections and
    tables inside them; ``None`` when it names no section (``ARQD_URL`` is the CLI's)."""
    cls: type[_Section] = Config
    path: list[str] = []
    while True:
        fields = _fields(cls)
        if rest in fields and (path or rest != "source"):
            return [*path, rest]  # a setting, or a whole section (ARQD_SCHEDULES='[{...}]')
        tables = {n: f.type for n, f in fields.items() if _section_of(f.type) or _is_dict(f.type)}
        name = next(
            (n for n in sorted(tables, key=len, reverse=True) if rest.startswith(n + "_")), None
        )
        if name is None:
            return [*path, rest] if path else None  # an unknown key is reported, not ignored
        path.append(name)
        rest = rest[len(name) + 1 :]
        section = _section_of(tables[name])
        if section is None:  # a table of named entries (handlers, groups): the rest is the name
            return [*path, rest]
        cls = section


def _is_dict(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Fold ``ARQD_<SECTION>_<KEY>`` variables into the raw config table; answer which setting
    each one set (setting path -> variable name)."""
    origins: dict[str, str] = {}
    for var, raw in sorted(environ.items()):
        path = _env_setting(var[5:].lower()) if var.startswith("ARQD_") else None
        if path is None:
            continue
        table = data
        for part in path[:-1]:
            if not isinstance(table.get(part), dict):
                table[part] = {}  # the variable replaces whatever the file had there
            table = table[part]
        table[path[-1]] = _env_value(raw)
        origins[".".join(path)] = var
    return origins


# --- loading --------------------------------------------------------------------------------------


def validate_config(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[Config | None, list[Problem]]:
    """Read, override from the environment and validate; answer the config (every invalid part
    left at its default, so later checks can still run on the rest) and every problem found.
    The config is ``None`` when the file itself cannot be read."""
    environ = os.environ if environ is None else environ
    source = "<defaults>" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            return None, [Problem(source, "", "no such file")]
        except tomllib.TOMLDecodeError as exc:
            return None, [Problem(source, "", f"not valid TOML: {exc}")]
        except (OSError, UnicodeDecodeError) as exc:
            return None, [Problem(source, "", f"cannot read: {exc}")]
    origins = apply_env(data, environ)
    cfg, problems = _validate(data, source, origins)
    base = Path(path).parent if path is not None else Path.cwd()
    return _resolve_paths(cfg, base), problems


def load_config(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, override from the environment and validate; raise :class:`ConfigError` naming,
    one line each, every problem's source, setting and reason."""
    cfg, problems = validate_config(path, environ)
    if problems or cfg is None:
        raise ConfigError("\n".join(map(str, problems)))
    return cfg


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Relative storage paths are relative to the config file, not to the working directory."""
    queue = msgspec.structs.replace(cfg.queue, path=str(base / cfg.queue.path))
    results = msgspec.structs.replace(cfg.results, path=str(base / cfg.results.path))
    steps = cfg.http_steps
    if steps.key_file is not None:
        steps = msgspec.structs.replace(steps, key_file=str(base / steps.key_file))
    return msgspec.structs.replace(cfg, queue=queue, results=results, http_steps=steps)
