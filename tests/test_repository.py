"""Rules about the repository's own files that keep a fresh clone working: every process that
runs Python is started with the interpreter of the running one (a bare ``python`` from ``PATH``
is not the project's venv on a fresh machine), and no module shadows a standard-library module
(``benchmarks/http.py`` once broke ``python benchmarks/throughput.py``: aiohttp's ``import http``
found it first)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The names a command line can start Python by: python, python3, python3.11, /usr/bin/python3,
# and the same after ``env``.
BARE_PYTHON = re.compile(r"^(?:\S*/)?python(?:\d+(?:\.\d+)*)?$")
# Calls whose first argument is a program and its arguments (a list) or a shell command line.
STARTERS = {
    "run",
    "Popen",
    "call",
    "check_call",
    "check_output",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "system",
    "popen",
    "spawnv",
    "spawnvp",
    "spawnl",
    "spawnlp",
    "execv",
    "execvp",
    "execl",
    "execlp",
}


def python_files() -> list[Path]:
    """Every Python file of the repository that git knows of (tracked or new, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).exists()]


def _words(node: ast.expr) -> list[str]:
    """The first two words of a command: a string's shell words, or a list's string items (a
    starred list or tuple inside counts as its items)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.split()[:2]
    if not isinstance(node, ast.List | ast.Tuple):
        return []
    items: list[ast.expr] = []
    for item in node.elts:
        inner = item.value if isinstance(item, ast.Starred) else None
        items.extend(inner.elts if isinstance(inner, ast.List | ast.Tuple) else [item])
    return [
        i.value if isinstance(i, ast.Constant) and isinstance(i.value, str) else ""
        for i in items[:2]
    ]


def starts_bare_python(words: list[str]) -> bool:
    if words[:1] == ["env"] or (words and words[0].endswith("/env")):
        words = words[1:]
    return bool(words) and BARE_PYTHON.match(words[0]) is not None


def bare_python_starts(source: str) -> list[tuple[int, str]]:
    """(line, code) of each place ``source`` starts a process by a bare ``python``: a call to
    one of STARTERS whose command (a list, exec-style arguments or a shell string) begins with
    one, or a list literal that does (an argv built before the call)."""
    found: dict[int, str] = {}
    for node in ast.walk(ast.parse(source)):
        command: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            # exec-style calls take the program and its arguments as separate arguments
            spread = name in {"create_subprocess_exec", "execl", "execlp", "spawnl", "spawnlp"}
            if name in STARTERS:
                command = ast.List(elts=list(node.args)) if spread else node.args[0]
        elif isinstance(node, ast.List | ast.Tuple):
            command = node
        if command is not None and starts_bare_python(_words(command)):
            found.setdefault(node.lineno, ast.unparse(node)[:80])
    return sorted(found.items())


def test_the_scan_finds_every_form_of_a_bare_python():
    """The scan below catches argv lists, exec-style arguments, shell strings and ``env``."""
    found = list(
        bare_python_starts(
            "import asyncio, os, subprocess\n"
            "subprocess.run(['python', '-m', 'arqd'])\n"
            "asyncio.create_subprocess_exec('python3', '-m', 'arqd')\n"
            "subprocess.run('python3 -m arqd serve', shell=True)\n"
            "os.system('/usr/bin/env python -c pass')\n"
            "cmd = ('python3.11', '-c', 'pass')\n"
            "subprocess.run([sys.executable, '-m', 'arqd'])\n"
            "info = {'python': '3.11'}\n"
        )
    )
    assert [line for line, _ in found] == [2, 3, 4, 5, 6]


def test_no_file_starts_a_bare_python():
    """Tests, benchmarks and examples start Python as ``sys.executable``, never ``python``."""
    offences = [
        f"{path.relative_to(ROOT)}:{line}: {code}"
        for path in python_files()
        for line, code in bare_python_starts(path.read_text())
    ]
    assert not offences, "start Python with sys.executable:\n" + "\n".join(offences)


def importable_dirs(files: list[Path]) -> set[Path]:
    """Directories that can be ``sys.path[0]``: the root (``python -m``, pytest) and every
    directory holding a script run by its path (a ``__main__`` guard outside ``__main__.py``)."""
    dirs = {ROOT}
    for path in files:
        if path.name != "__main__.py" and '__name__ == "__main__"' in path.read_text():
            dirs.add(path.parent)
    return dirs


def test_no_module_shadows_the_standard_library():
    """No module or package a script's directory puts on sys.path has a stdlib module's name."""
    files = python_files()
    offences = []
    for directory in sorted(importable_dirs(files)):
        for path in files:
            if path.parent == directory:
                name = path.stem
            elif path.parent.parent == directory and path.name == "__init__.py":
                name = path.parent.name
            else:
                continue
            if name in sys.stdlib_module_names:
                offences.append(f"{path.relative_to(ROOT)} is importable as `{name}`")
    assert not offences, "rename them:\n" + "\n".join(offences)
