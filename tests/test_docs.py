"""Every fenced code block of README.md, docs/*.md and benchmarks/README.md works as written.

Each block is one test, named and reported by file and line. Its language (the first word after
the opening fence) says how it is checked; a block with no language or another one fails:

- ``sh``: run by ``bash -euo pipefail`` in a scratch copy of the repository (a fresh clone, with
  the suite's virtual environment as its ``.venv``, and ``PYTHONPATH`` at the copy), with the
  venv *not* on ``PATH``: as on a fresh machine, ``python`` is not the venv's, so commands say
  ``.venv/bin/...``. Whatever the block leaves running in the background is stopped after it.
- ``python``: run as a script by ``.venv/bin/python`` from the root of such a copy (so
  ``config.toml`` is the repository's).
- ``toml``: a config, or a part of one with its table headers (every setting has a default), and
  must pass ``arqd.config.load_config``.
- ``env``: ``ARQD_<SECTION>_<KEY>=value`` lines (an ``EnvironmentFile``), which must load over
  the repository's ``config.toml``.
- ``json`` must parse; ``yaml`` must parse; ``text`` (diagrams, output) is not checked.

An HTML comment on the line before a fence changes that, and says why:

- ``<!-- doc-test: skip-run (reason) -->``: the block cannot run here (systemd, root, a long
  benchmark, production paths); an ``sh`` block is only parsed (``bash -n``), a ``python`` one
  compiled (top-level ``await`` allowed).
- ``<!-- doc-test: daemon (reason) -->``: an ``sh`` block that needs a daemon running (README:
  "from another shell"); the test starts ``.venv/bin/arqd serve -c config.toml`` in the copy
  first and stops it after.

Ports: blocks speak of arqd at ``localhost:8080`` (or ``127.0.0.1:8080``) and of a moto server
at port 5000. Each block runs with those replaced by free ports (in ``host:port`` and after
``-p``/``--port``), and with ``ARQD_URL`` pointing at the one that stands for 8080, so that a
block never depends on a fixed port being free.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from arqd.config import load_config
from arqd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]
LANGUAGES = ("sh", "python", "toml", "env", "json", "yaml", "text")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<kind>[\w-]+)\s*(?:\((?P<why>[^)]*)\))?\s*-->\s*$")
MARKERS = {"skip-run": ("sh", "python"), "daemon": ("sh",)}  # marker → the languages it fits
# Commands that change the machine itself: an unmarked block holding one fails before it runs
# (a first draft of this test ran the systemd install of docs/operations.md as root).
SYSTEM_CHANGES = re.compile(
    r"\b(?:sudo|useradd|userdel|groupadd|systemctl|apt-get|apt|dnf|yum)\b"
    r"|(?:^|[\s\"'=>])/(?:etc|opt|usr|var/lib)/",
    re.MULTILINE,
)
DOC_PORTS = (8080, 5000)  # arqd's and moto's, as the docs write them
BLOCK_TIMEOUT = 90.0
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".venv-*", "var", "__pycache__", ".*_cache", "*.egg-info", "build", "dist"
)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    marker: str | None
    reason: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, each with the marker on the line before it."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [ln[min(indent, len(ln) - len(ln.lstrip(" "))) :] for ln in lines[i + 1 : end]]
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        found.append(
            Block(
                path=path,
                line=i + 1,
                language=(opening["info"].split() or [""])[0],
                marker=marker["kind"] if marker else None,
                reason=marker["why"] if marker else None,
                text="\n".join(body) + "\n",
            )
        )
        i = end + 1
    return found


BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]


# --- the scratch copy and its environment -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scratch_copy(tmp_path: Path) -> Path:
    """The repository as a fresh clone has it, with a ``.venv`` that sees the suite's packages."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE, symlinks=True)
    scratch_venv(copy / ".venv")
    return copy


def scratch_venv(target: Path) -> None:
    """A venv of its own that imports the suite's packages (a .pth adds the suite's
    site-packages as a site directory) and has the suite's console scripts (``arqd``,
    ``moto_server``, …) pointed at its own python. Never the suite's venv itself: a block that
    runs ``pip install`` (scripts/venv does) then installs here, not into the suite's venv."""
    assert sys.prefix != sys.base_prefix, "run the suite from a virtual environment (scripts/test)"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    python = target / "bin" / "python"
    purelib = sysconfig.get_paths(vars={"base": str(target), "platbase": str(target)})["purelib"]
    suite = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "suite.pth").write_text(f"import site; site.addsitedir({suite!r})\n")
    for script in Path(sys.executable).parent.iterdir():
        mine = target / "bin" / script.name
        if mine.exists() or not script.is_file():
            continue
        with script.open("rb") as f:
            if f.readline().rstrip() != f"#!{sys.executable}".encode():
                continue
            rest = f.read()
        mine.write_bytes(f"#!{python}\n".encode() + rest)
        mine.chmod(0o755)


def block_env(copy: Path, ports: dict[int, int]) -> dict[str, str]:
    """A new user's shell: no ARQD_* settings, no venv on PATH, arqd imported from the copy."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQD_") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["PYTHONPATH"] = str(copy)
    env["ARQD_URL"] = f"http://127.0.0.1:{ports[8080]}"
    return env


def with_ports(text: str, ports: dict[int, int]) -> str:
    """The block with the documented ports replaced by this run's."""
    for doc_port, port in ports.items():
        text = re.sub(rf"\b(localhost|127\.0\.0\.1):{doc_port}\b", rf"\g<1>:{port}", text)
        text = re.sub(rf"(\s(?:-p|--port)[ =]){doc_port}\b", rf"\g<1>{port}", text)
    return text


def run(argv: list[str], block: Block, copy: Path, env: dict[str, str]) -> None:
    """Run one block's process in its own session; stop whatever it left behind; fail with the
    block's place, its text and its output unless it exited 0."""
    proc = subprocess.Popen(
        argv,
        cwd=copy,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{block.where}: did not finish in {BLOCK_TIMEOUT:g} s\n{block.text}\n{out!r}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # what the block left in the background
            os.killpg(proc.pid, signal.SIGKILL)
    output = out.decode(errors="replace")
    assert proc.returncode == 0, (
        f"{block.where}: {block.language} block exited {proc.returncode}\n"
        f"--- block ---\n{block.text}--- output ---\n{output[-4000:]}"
    )


class Daemon:
    """``.venv/bin/arqd serve -c config.toml`` in the copy, on the port standing for 8080."""

    def __init__(self, copy: Path, env: dict[str, str], port: int) -> None:
        self.log = copy / "daemon.log"
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [str(copy / ".venv/bin/arqd"), "serve", "-c", "config.toml"],
                cwd=copy,
                env={**env, "ARQD_SERVER_LISTEN": f"127.0.0.1:{port}"},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"arqd serve exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"arqd serve not ready in {limit:g} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- the checks, by language ------------------------------------------------------------------


def check_sh(block: Block, tmp_path: Path) -> None:
    if block.marker == "skip-run":
        done = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        assert done.returncode == 0, f"{block.where}: not valid bash:\n{done.stderr}"
        return
    changes_system = SYSTEM_CHANGES.search(block.text)
    assert changes_system is None, (
        f"{block.where}: {changes_system[0].strip()!r} would change the machine the tests run on"
        " (and needs root): mark the block <!-- doc-test: skip-run (why) -->"
    )
    copy = scratch_copy(tmp_path)
    ports = {doc_port: free_port() for doc_port in DOC_PORTS}
    env = block_env(copy, ports)
    script = "set -euo pipefail\n" + with_ports(block.text, ports)
    daemon = Daemon(copy, env, ports[8080]) if block.marker == "daemon" else None
    try:
        if daemon is not None:
            daemon.wait_ready()
        run(["bash", "-c", script], block, copy, env)
    finally:
        if daemon is not None:
            daemon.stop()


def check_python(block: Block, tmp_path: Path) -> None:
    if block.marker == "skip-run":
        try:
            compile(block.text, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as exc:
            pytest.fail(f"{block.where}: not valid Python: {exc}")
        return
    copy = scratch_copy(tmp_path)
    ports = {doc_port: free_port() for doc_port in DOC_PORTS}
    script = copy / "doc_block.py"
    script.write_text(with_ports(block.text, ports))
    run([str(copy / ".venv/bin/python"), script.name], block, copy, block_env(copy, ports))


def check_toml(block: Block, tmp_path: Path) -> None:
    config = tmp_path / "block.toml"
    config.write_text(block.text)
    try:
        load_config(config, environ={})
    except ConfigError as exc:
        pytest.fail(f"{block.where}: not a valid arqd config (or part of one): {exc}")


def check_env(block: Block, tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    for number, line in enumerate(block.text.splitlines(), start=block.line + 1):
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name.startswith("ARQD_"), f"{block.where}: line {number}: {line!r}"
            environ[name.strip()] = value.strip()
    try:
        load_config(ROOT / "config.toml", environ=environ)
    except ConfigError as exc:
        pytest.fail(f"{block.where}: these settings do not load over config.toml: {exc}")


def check_json(block: Block, tmp_path: Path) -> None:
    try:
        json.loads(block.text)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{block.where}: not valid JSON: {exc}")


def check_yaml(block: Block, tmp_path: Path) -> None:
    try:
        yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        pytest.fail(f"{block.where}: not valid YAML: {exc}")


CHECKS = {
    "sh": check_sh,
    "python": check_python,
    "toml": check_toml,
    "env": check_env,
    "json": check_json,
    "yaml": check_yaml,
}


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_block_works_as_written(block: Block, tmp_path: Path):
    """The block runs (sh, python) or is valid (toml, env, json, yaml) as the docs show it."""
    assert block.language in LANGUAGES, (
        f"{block.where}: a code block needs a language, one of {', '.join(LANGUAGES)} "
        f"(text for diagrams and output), not {block.language!r}"
    )
    if block.marker is not None:
        assert block.marker in MARKERS, f"{block.where}: unknown doc-test marker {block.marker!r}"
        assert block.reason, f"{block.where}: say why: <!-- doc-test: {block.marker} (why) -->"
        assert block.language in MARKERS[block.marker], (
            f"{block.where}: {block.marker} is for {' and '.join(MARKERS[block.marker])} blocks"
        )
    if block.language != "text":
        CHECKS[block.language](block, tmp_path)


def test_every_document_is_read():
    """The documents checked are every Markdown file of the root, docs/ and benchmarks/."""
    on_disk = {
        *ROOT.glob("*.md"),
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "benchmarks").glob("*.md"),
    }
    assert on_disk - {ROOT / "CHANGELOG.md"} == set(DOCS)
    assert BLOCKS, "no code blocks found: the extraction is broken"


def test_a_block_that_would_change_the_machine_must_be_marked(tmp_path: Path):
    """An unmarked sh block installing into /opt or adding users fails without running."""
    for text in ("useradd --system arqd\n", "python3 -m venv /opt/arqd\n", "cp a '/etc/arqd/x'\n"):
        block = Block(ROOT / "README.md", 1, "sh", None, None, text)
        with pytest.raises(AssertionError, match="would change the machine"):
            check_sh(block, tmp_path)
    assert not (tmp_path / "repo").exists()  # refused before the scratch copy was even made
