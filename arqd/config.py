"""``config.toml``: the schema (API.md section 6), loading, validation and environment overrides.

Every section is a frozen msgspec Struct that rejects unknown keys, so a typo is an error rather
than a silently ignored setting. Durations are strings such as ``"500ms"``, ``"30s"``, ``"5m"``,
``"24h"`` (or plain numbers of seconds); sizes are ``"64KiB"``, ``"1MiB"`` (or plain bytes).
``ARQD_<SECTION>_<KEY>`` environment variables override file settings; their values are read as
TOML values when they parse as such (``64``, ``true``, ``["a", "b"]``) and as strings otherwise.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from arqd.errors import ConfigError

__all__ = ["Config", "load_config", "parse_duration", "parse_size"]


class Duration(float):
    """Seconds, written in config as ``"30s"``."""


class Size(int):
    """Bytes, written in config as ``"64KiB"``."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
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
    if kind is Duration:
        return Duration(parse_duration(value))
    if kind is Size:
        return Size(parse_size(value))
    raise NotImplementedError(kind)


QueueName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Config tables are immutable and reject unknown keys; subclasses inherit both."""


class ServerConfig(_Section, frozen=True):
    listen: str = "127.0.0.1:8080"
    max_body: Size = Size(1024**2)
    allow_anonymous: bool = False
    # Bytes of job JSON the status-poll cache keeps (arqd/http/cache.py); 0 turns it off.
    status_cache: Size = Size(16 * 1024**2)
    # Long-polls (``?wait=``) and event streams open at once; beyond, 429 with Retry-After.
    max_held: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


class QueueConfig(_Section, frozen=True):
    backend: Literal["memory", "sqlite", "dynamodb"] = "sqlite"
    path: str = "var/arqd.sqlite3"
    synchronous: Literal["normal", "full"] = "normal"
    table: str = "arqd"
    region: str | None = None
    endpoint_url: str | None = None
    shards: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8


class ResultsConfig(_Section, frozen=True):
    backend: Literal["memory", "files", "s3"] = "files"
    path: str = "var/results"
    bucket: str = "arqd-results"
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    temporary_ttl: Duration = Duration(24 * 3600)
    inline_max: Size = Size(64 * 1024)


class WorkersConfig(_Section, frozen=True):
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 32
    queues: list[QueueName] = msgspec.field(default_factory=lambda: ["default"])
    visibility_timeout: Duration = Duration(30)
    shutdown_grace: Duration = Duration(30)
    heartbeat: Duration | None = None  # default: a third of visibility_timeout, at most 2 s
    batch: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    poll_max: Duration = Duration(0.5)

    def __post_init__(self) -> None:
        if self.visibility_timeout < 1:
            raise ValueError("visibility_timeout must be at least 1s")
        if self.heartbeat is not None and self.heartbeat >= self.visibility_timeout:
            raise ValueError("heartbeat must be shorter than visibility_timeout")

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
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    timeout: Duration = Duration(300)
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)


class HandlerConfig(_Section, frozen=True):
    call: str
    timeout: Duration | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    cache: bool = False
    sticky: bool = False
    queue: QueueName | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^[\w.]+:[\w.]+$", self.call):
            raise ValueError(f'call must be "module:function", got {self.call!r}')


class GroupJob(_Section, frozen=True):
    handler: str
    name: str | None = None
    payload: Any = None
    queue: QueueName | None = None
    key: str | None = None
    sticky: bool = False
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    timeout: Duration | None = None
    meta: dict[str, Any] | None = None


class GroupConfig(_Section, frozen=True):
    jobs: list[GroupJob]


class ScheduleConfig(_Section, frozen=True):
    name: str
    handler: str
    cron: str | None = None
    every: Duration | None = None
    payload: Any = None
    queue: QueueName | None = None
    timezone: str = "UTC"
    catch_up: Literal["none", "last"] = "last"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r} needs exactly one of cron or every")


class TokenConfig(_Section, frozen=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    scopes: list[Literal["submit", "read", "cancel", "admin"]]


class AuthConfig(_Section, frozen=True):
    tokens: list[TokenConfig] = msgspec.field(default_factory=list)


class HttpStepsConfig(_Section, frozen=True):
    allow_hosts: list[str] = msgspec.field(default_factory=list)
    # Step secrets are stored encrypted with this Fernet key: ``key`` (e.g. from the
    # environment, ARQD_HTTP_STEPS_KEY) or else the file ``key_file``, made on first use.
    # Every daemon sharing a backend needs the same key.
    key: str | None = None
    key_file: str = "var/steps.key"


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
    source: str = "<defaults>"

    def handler_configs(self) -> dict[str, HandlerConfig]:
        """Every handler in its long form."""
        return {
            name: HandlerConfig(call=h) if isinstance(h, str) else h
            for name, h in self.handlers.items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Config:
        _check_tables(data, source)
        try:
            cfg = msgspec.convert(dict(data), cls, dec_hook=_dec_hook, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(source, str(exc))) from None
        cfg = msgspec.structs.replace(cfg, source=source)
        _check_references(cfg)
        return cfg


def _check_tables(data: Mapping[str, Any], source: str) -> None:
    """Validate named tables one entry at a time, so an error names the entry (msgspec's own
    path for a dict value is ``handlers[...]``)."""
    for section, kind in (("handlers", str | HandlerConfig), ("groups", GroupConfig)):
        table = data.get(section)
        if not isinstance(table, Mapping):
            continue
        for name, value in table.items():
            try:
                msgspec.convert(value, kind, dec_hook=_dec_hook, strict=False)
            except msgspec.ValidationError as exc:
                raise ConfigError(_explain(source, str(exc), f"{section}.{name}")) from None


def _explain(source: str, message: str, prefix: str = "") -> str:
    """Turn msgspec's ``reason - at `$.workers.concurrency` `` into ``file: setting: reason``."""
    reason, _, where = message.partition(" - at ")
    parts = [prefix, where.strip("`").removeprefix("$").lstrip(".")]
    m = re.match(r"Object contains unknown field `(.+)`", reason)
    if m:
        parts.append(m.group(1))
        reason = "unknown setting"
    setting = ".".join(p for p in parts if p) or "(top level)"
    return f"{source}: {setting}: {reason}"


def _check_references(cfg: Config) -> None:
    names = set(cfg.handlers) | {"arqd.steps"}
    for group, spec in cfg.groups.items():
        if not spec.jobs:
            raise ConfigError(f"{cfg.source}: groups.{group}: a group needs at least one job")
        for job in spec.jobs:
            if job.handler not in names:
                raise ConfigError(f"{cfg.source}: groups.{group}: unknown handler {job.handler!r}")
    _check_allow_hosts(cfg)
    seen: set[str] = set()
    for sched in cfg.schedules:
        if sched.handler not in names:
            raise ConfigError(
                f"{cfg.source}: schedules.{sched.name}: unknown handler {sched.handler!r}"
            )
        if sched.name in seen:
            raise ConfigError(f"{cfg.source}: schedules.{sched.name}: duplicate schedule name")
        seen.add(sched.name)
        _check_schedule(sched, cfg.source)


def _check_allow_hosts(cfg: Config) -> None:
    from arqd.steps import parse_allow_hosts  # the HTTP machinery loads only when needed

    try:
        parse_allow_hosts(cfg.http_steps.allow_hosts)
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: http_steps.{exc}") from None


def _check_schedule(sched: ScheduleConfig, source: str) -> None:
    where = f"{source}: schedules.{sched.name}"
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", sched.name):
        raise ConfigError(f"{where}: a name of letters, digits, '_', '.', '-'")
    if sched.cron is not None:
        fields = len(sched.cron.split())
        if fields not in (5, 6) or not croniter.is_valid(
            sched.cron, second_at_beginning=fields == 6
        ):
            raise ConfigError(f"{where}.cron: not a 5- or 6-field cron expression: {sched.cron!r}")
    if sched.every is not None and sched.every < 1:
        raise ConfigError(f"{where}.every: at least 1s")
    try:
        ZoneInfo(sched.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}.timezone: unknown time zone {sched.timezone!r}") from None


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Fold ``ARQD_<SECTION>_<KEY>`` variables into the raw config table."""
    sections = {f.name for f in msgspec.structs.fields(Config)} - {"source"}
    for var, raw in environ.items():
        if not var.startswith("ARQD_"):
            continue
        rest = var[5:].lower()
        section = next(
            (s for s in sorted(sections, key=len, reverse=True) if rest.startswith(s + "_")), None
        )
        if section is None:
            continue
        key = rest[len(section) + 1 :]
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = _env_value(raw)
    return data


def load_config(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, override from the environment and validate; raise :class:`ConfigError` naming the
    file, the setting and the reason."""
    environ = os.environ if environ is None else environ
    source = "<defaults>" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    data = apply_env(data, environ)
    cfg = Config.from_dict(data, source)
    base = Path(path).parent if path is not None else Path.cwd()
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Relative storage paths are relative to the config file, not to the working directory."""
    queue = msgspec.structs.replace(cfg.queue, path=str(base / cfg.queue.path))
    results = msgspec.structs.replace(cfg.results, path=str(base / cfg.results.path))
    steps = msgspec.structs.replace(cfg.http_steps, key_file=str(base / cfg.http_steps.key_file))
    return msgspec.structs.replace(cfg, queue=queue, results=results, http_steps=steps)
