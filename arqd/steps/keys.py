"""The Fernet keys that seal a multi-step job's secrets, and where they come from.

A job record holds its raw steps and credentials only sealed (:func:`seal`); the worker opens
them with :func:`unseal`. The keys are ``[http_steps] keys`` (seal with the first, open with any:
how a key is rotated), else ``key``, else the key file (:func:`step_keys`); :func:`check_keys`
is the start, reload and ``check-config`` check; ``arqd steps-key new`` prints :func:`new_key`.
No key is ever logged or quoted.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from arqd.errors import ConfigError, CredentialsUnreadable, InvalidRequest
from arqd.stepmodel import Credentials, is_fernet_key, parse_credentials

if TYPE_CHECKING:
    from arqd.config import Config

__all__ = [
    "KEY_FILE",
    "Keys",
    "check_keys",
    "decrypt_credentials",
    "encrypt_credentials",
    "key_file",
    "load_or_create_key",
    "load_or_create_keys",
    "new_key",
    "read_keys",
    "seal",
    "step_keys",
    "unseal",
]

Keys = bytes | Sequence[bytes]
"""One Fernet key, or a keyring: seal with the first, open with any."""


def _fernet(key: Keys) -> Fernet | MultiFernet:
    keys = [key] if isinstance(key, bytes) else list(key)
    try:
        fernets = [Fernet(k) for k in keys]
    except (ValueError, TypeError):
        raise ConfigError("the step credentials key is not a valid Fernet key") from None
    if not fernets:
        raise ConfigError("no key to seal step secrets with")
    return fernets[0] if len(fernets) == 1 else MultiFernet(fernets)


def encrypt_credentials(creds: Credentials, key: Keys) -> str:
    """The credentials as a Fernet token (ASCII), the only form in which a job record holds them."""
    return _fernet(key).encrypt(msgspec.json.encode(creds.to_dict())).decode("ascii")


def seal(value: Any, key: Keys) -> str:
    """Any JSON value as a Fernet token: how a job record holds its steps' secrets."""
    return _fernet(key).encrypt(msgspec.json.encode(value)).decode("ascii")


def unseal(token: str | bytes, key: Keys) -> Any:
    """Inverse of :func:`seal`; :class:`CredentialsUnreadable` when no key opens it."""
    try:
        return msgspec.json.decode(_fernet(key).decrypt(token))
    except (InvalidToken, msgspec.DecodeError):
        raise CredentialsUnreadable(
            "the job's sealed step data cannot be opened with this daemon's keys (every daemon "
            "needs the key that sealed it in http_steps.keys, http_steps.key or key_file)"
        ) from None


def decrypt_credentials(token: str | bytes, key: Keys) -> Credentials:
    """Inverse of :func:`encrypt_credentials`; :class:`CredentialsUnreadable` on a wrong key."""
    try:
        data = msgspec.json.decode(_fernet(key).decrypt(token), type=dict[str, str])
        creds = parse_credentials(data)
    except (InvalidToken, msgspec.DecodeError, InvalidRequest):
        raise CredentialsUnreadable(
            "stored step credentials cannot be decrypted with this key"
        ) from None
    if creds is None:  # pragma: no cover - parse_credentials answers None only for None
        raise CredentialsUnreadable("stored step credentials are empty")
    return creds


# --- where the keys come from ---------------------------------------------------------------------

KEY_FILE = "steps.key"  # the default key file's name, beside the sqlite database
_process_key: list[bytes] = []  # the memory backend's key: its jobs die with the process


def new_key() -> bytes:
    """A fresh Fernet key (what ``arqd steps-key new`` prints)."""
    return Fernet.generate_key()


def step_keys(config: Config, multi_host: bool = False) -> tuple[bytes, ...]:
    """The keys sealing step secrets (the first seals, any opens): ``http_steps.keys``, else
    ``key``, else the key file (made when missing, except for a queue several hosts share);
    a memory queue without any uses a key of this process. :class:`ConfigError` if none."""
    cfg = config.http_steps
    if cfg.key_list:
        return tuple(k.encode() for k in cfg.key_list)
    if cfg.key is not None:
        return (cfg.key.encode(),)
    path = key_file(config)
    if multi_host:
        check_keys(config, multi_host)
        assert path is not None  # check_keys refuses a shared queue without an existing file
        return read_keys(path)
    if path is not None:
        return load_or_create_keys(path)
    if config.queue.backend == "memory":
        if not _process_key:
            _process_key.append(new_key())
        return (_process_key[0],)
    raise ConfigError(  # pragma: no cover - every backend has a default or is multi_host
        f"{config.source}: http_steps: set keys, key or key_file"
    )


def key_file(config: Config) -> Path | None:
    """``http_steps.key_file``; by default ``steps.key`` beside the sqlite database, where every
    daemon using that database finds it (None for other backends)."""
    if config.http_steps.key_file is not None:
        return Path(config.http_steps.key_file)
    if config.queue.backend == "sqlite":
        return Path(config.queue.path).parent / KEY_FILE
    return None


def check_keys(config: Config, multi_host: bool) -> None:
    """The start (and reload, and ``check-config``) check of the steps keys: a queue shared by
    several hosts (``multi_host``) needs keys every host agrees on, given explicitly; an
    existing key file must be private and hold keys. Never quotes a key."""
    cfg = config.http_steps
    if cfg.key_list or cfg.key is not None:
        return  # their shape was checked when the config loaded
    path = key_file(config)
    if multi_host and (cfg.key_file is None or path is None or not path.exists()):
        missing = "" if cfg.key_file is None else f" ({cfg.key_file} does not exist)"
        raise ConfigError(
            f"{config.source}: http_steps: the {config.queue.backend} queue is shared by "
            "daemons on several hosts, and step secrets sealed on one must open on all, but no "
            f"key is set{missing}: set the same http_steps.keys (or http_steps.key) on every "
            "daemon, e.g. ARQD_HTTP_STEPS_KEYS (or ARQD_HTTP_STEPS_KEY) in the environment, "
            "or point http_steps.key_file at a key file present on every host"
        )
    if path is not None and path.exists():
        read_keys(path)


def load_or_create_key(path: Path) -> bytes:
    """The (first) Fernet key in ``path``, made when missing: see :func:`load_or_create_keys`."""
    return load_or_create_keys(path)[0]


def load_or_create_keys(path: Path) -> tuple[bytes, ...]:
    """The Fernet keys in ``path`` (one a line, the first seals), a new key written there
    (mode 0600, atomically) when the file is missing.

    A key file readable by group or others is refused (:class:`ConfigError`), as ssh does.
    """
    try:
        return read_keys(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # publish whole, and never over a key another process just made
        except FileExistsError:
            return read_keys(path)
        _fsync_dir(path.parent)
    finally:
        os.unlink(tmp)
    return (key,)


def read_keys(path: Path) -> tuple[bytes, ...]:
    """The keys of an existing key file; :class:`ConfigError` if others may read it or a line
    is not a key (the message names the line, never the key)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{path}: the step credentials key must be readable by its owner only (chmod 600)"
            )
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise  # load_or_create_keys makes it
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the steps key file: {exc.strerror}") from None
    keys = tuple(line.strip() for line in lines if line.strip())
    for number, key in enumerate(keys, 1):
        if not is_fernet_key(key):
            raise ConfigError(f"{path}: key {number} is not a Fernet key")
    if not keys:
        raise ConfigError(f"{path}: the steps key file holds no key")
    return keys


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
