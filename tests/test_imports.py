"""Dependencies point one way: model ← backends ← core ← faces (docs/architecture.md).

Every module under ``arqd/`` is parsed (``ast``, nothing is imported) and each of its imports
of arqd, wherever it stands (module level, in a function, under ``TYPE_CHECKING``), is an arrow
checked against ``LAYERS``: a module imports its own layer or lower ones, never a higher one; a
backend imports no other backend (only the shared contracts and toolkits of ``SHARED``); the
config loads without the step runner; the core and the pool are not welded to Prometheus.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from .daemons import ROOT

PACKAGE = ROOT / "arqd"

MODEL, BACKENDS, CORE, FACE = "model", "backends", "core", "face"
RANK = {MODEL: 0, BACKENDS: 1, CORE: 2, FACE: 3}

# The layer of every module. A package's entry covers its modules unless a longer name has its
# own; ``arqd`` itself (the lazy public surface) covers only ``arqd/__init__.py``. A module with
# no layer fails the test: place it here when you add it.
LAYERS = {
    # the model: data, its validation, its views and its wire form; leaf tools importing no arqd
    "arqd.model": MODEL,
    "arqd.errors": MODEL,
    "arqd.clock": MODEL,
    "arqd.closing": MODEL,
    "arqd.config": MODEL,
    "arqd.stepmodel": MODEL,
    "arqd.jsonpointer": MODEL,
    "arqd.view": MODEL,
    "arqd.groups": MODEL,
    "arqd.api": MODEL,
    "arqd.http.wire": MODEL,
    "arqd.logs": MODEL,
    "arqd.gcpolicy": MODEL,
    "arqd.malloc": MODEL,
    "arqd.systemd": MODEL,
    "arqd.supervise": MODEL,
    # storage: the queue backends, the result stores, their contracts and toolkits
    "arqd.backends": BACKENDS,
    "arqd.results": BACKENDS,
    # the core: the rules, the pool, schedules, steps, and the one place a backend is chosen
    "arqd.core": CORE,
    "arqd.outcomes": CORE,
    "arqd.resultio": CORE,
    "arqd.follow": CORE,
    "arqd.hub": CORE,
    "arqd.handlers": CORE,
    "arqd.schedules": CORE,
    "arqd.steps": CORE,
    "arqd.pool": CORE,
    "arqd.observe": CORE,
    "arqd.stores": CORE,
    "arqd.demo": CORE,
    # the faces: embedding, the clients, HTTP, the CLI, the daemon, Prometheus, arqd.testing
    "arqd": FACE,
    "arqd.__main__": FACE,
    "arqd.app": FACE,
    "arqd.client": FACE,
    "arqd.metrics": FACE,
    "arqd.http": FACE,
    "arqd.cli": FACE,
    "arqd.daemon": FACE,
    "arqd.testing": FACE,  # the memory backends and an App for users' tests
}

# Storage modules every backend may import: the contracts and the driver toolkits.
SHARED = {"arqd.backends.base", "arqd.backends.aws", "arqd.backends.network", "arqd.results.base"}
# Modules that are part of one backend without being inside its package.
PART_OF = {"arqd.backends.sqlite_queries": "arqd.backends.sqlite"}

# Outside packages only some layers may import: (package, the lowest layer allowed).
EXTERNAL = {"prometheus_client": FACE, "aiohttp.web": FACE}

# Arrows that are wrong whatever the layers say: (importer, imported, why).
FORBIDDEN = [
    ("arqd.config", "arqd.steps", "the config loads without the step runner"),
    ("arqd.core", "arqd.metrics", "the core reports to an observer, not to Prometheus"),
    ("arqd.pool", "arqd.metrics", "the pool reports to an observer, not to Prometheus"),
]

# Modules that must load nothing above the model (``arqd.HttpClient`` in a program that only
# talks to a daemon: no core, hub, metrics or handlers).
MODEL_ONLY = {"arqd.http.client"}

# Arrows still wrong, each to be fixed by a part of issue 13 (the last, core → metrics, went with
# the pool part). This set MUST BE EMPTY when issue 13 is merged; the test fails when an entry no
# longer occurs, so it only shrinks.
KNOWN_WRONG: set[tuple[str, str]] = set()


# --- reading the arrows ---------------------------------------------------------------------------


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path = PACKAGE) -> bool:
    """Whether ``name`` (``arqd.x.y``) is a module or package of the source tree."""
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(source: str, name: str, is_package: bool, root: Path = PACKAGE) -> set[str]:
    """The modules (of arqd, and the ``EXTERNAL`` ones) that a module's source imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                wanted = sub in EXTERNAL or (sub.startswith("arqd.") and is_module(sub, root))
                found.add(sub if wanted else base)
    return {m for m in found if _ours(m) or _external(m) is not None}


def _ours(module: str) -> bool:
    return module == "arqd" or module.startswith("arqd.")


def _external(module: str) -> str | None:
    for package in EXTERNAL:
        if module == package or module.startswith(package + "."):
            return package
    return None


def arrows(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the tree and what it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        graph[name] = imports_of(path.read_text(), name, path.name == "__init__.py", root)
    return graph


# --- judging them ---------------------------------------------------------------------------------


def layer_of(module: str) -> str | None:
    if module == "arqd":
        return LAYERS["arqd"]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def backend_of(module: str) -> str | None:
    """``arqd.backends.sqlite`` for any module of that backend (a module or a package)."""
    parts = module.split(".")
    if layer_of(module) != BACKENDS or module in SHARED or len(parts) < 3:
        return None
    return PART_OF.get(module, ".".join(parts[:3]))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def wrong(graph: Mapping[str, Iterable[str]]) -> dict[tuple[str, str], str]:
    """Each wrong arrow of ``graph`` and why it is wrong."""
    found: dict[tuple[str, str], str] = {}
    for importer, imported_all in graph.items():
        mine = layer_of(importer)
        if mine is None:
            continue  # reported by unplaced()
        for imported in imported_all:
            why = _why_wrong(importer, mine, imported)
            if why:
                found[(importer, imported)] = why
    return found


def _why_wrong(importer: str, mine: str, imported: str) -> str | None:
    package = _external(imported)
    if package is not None:
        lowest = EXTERNAL[package]
        return f"only the {lowest} layer imports {package}" if RANK[mine] < RANK[lowest] else None
    for a, b, why in FORBIDDEN:
        if _under(importer, a) and _under(imported, b):
            return why
    theirs = layer_of(imported)
    if theirs is None:
        return None  # reported by unplaced() when it is a module of the tree
    if importer in MODEL_ONLY and theirs != MODEL and imported not in ("arqd", "arqd.http"):
        return f"{importer} loads nothing above the model"
    if RANK[theirs] > RANK[mine]:
        return f"the {mine} layer imports the {theirs} layer"
    mine_backend, their_backend = backend_of(importer), backend_of(imported)
    if mine_backend and their_backend and mine_backend != their_backend:
        return "a backend imports another backend (share code through a toolkit in SHARED)"
    return None


def unplaced(graph: Mapping[str, Iterable[str]]) -> set[str]:
    return {module for module in graph if layer_of(module) is None}


# --- the tests ------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    """Each module under arqd/ is placed in LAYERS, so each arrow can be judged."""
    assert unplaced(arrows()) == set()


def test_dependencies_point_one_way():
    """No arrow points up a layer, between backends, from the config to the steps, from the core
    or the pool to Prometheus, or from the HTTP client past the model, beyond KNOWN_WRONG."""
    found = wrong(arrows())
    new = {arrow: why for arrow, why in found.items() if arrow not in KNOWN_WRONG}
    assert new == {}, "\n".join(f"{a} -> {b}: {why}" for (a, b), why in sorted(new.items()))


def test_known_wrong_arrows_still_occur():
    """KNOWN_WRONG only shrinks: an arrow fixed since is taken off the list."""
    fixed = KNOWN_WRONG - set(wrong(arrows()))
    assert fixed == set(), f"fixed, remove from KNOWN_WRONG: {sorted(fixed)}"


def test_the_check_finds_made_up_wrong_arrows():
    """Each rule refuses an arrow made up to break it, and lets the right ones through."""
    graph = {
        "arqd.model": {"arqd.core"},  # up a layer
        "arqd.backends.sqlite": {
            "arqd.backends.memory",
            "arqd.backends.base",
            "arqd.backends.sqlite_queries",
        },
        "arqd.backends.dynamodb.leasing": {"arqd.backends.dynamodb.codec", "arqd.results.s3"},
        "arqd.results.s3": {"arqd.backends.aws", "arqd.results.base", "arqd.model"},
        "arqd.config": {"arqd.steps.spec", "arqd.model"},
        "arqd.core": {"prometheus_client", "arqd.backends.base", "arqd.steps"},
        "arqd.pool.attempt": {"arqd.metrics", "arqd.core"},
        "arqd.http.client": {"arqd.core", "arqd.view", "arqd.http.wire", "arqd"},
        "arqd.http.server": {"arqd.core", "prometheus_client", "aiohttp.web", "arqd.app"},
        "arqd.steps.runner": {"aiohttp.web"},
        "arqd.brand_new": {"arqd.model"},
    }
    assert set(wrong(graph)) == {
        ("arqd.model", "arqd.core"),
        ("arqd.backends.sqlite", "arqd.backends.memory"),
        ("arqd.backends.dynamodb.leasing", "arqd.results.s3"),
        ("arqd.config", "arqd.steps.spec"),
        ("arqd.core", "prometheus_client"),
        ("arqd.pool.attempt", "arqd.metrics"),
        ("arqd.http.client", "arqd.core"),
        ("arqd.steps.runner", "aiohttp.web"),
    }
    assert unplaced(graph) == {"arqd.brand_new"}


def test_imports_are_read_from_every_form_of_import(tmp_path: Path):
    """Plain, from, relative, lazy (in a function) and TYPE_CHECKING imports are all arrows."""
    pkg = tmp_path / "arqd"
    (pkg / "backends").mkdir(parents=True)
    for name in ("__init__", "core", "model", "backends/__init__", "backends/base"):
        (pkg / f"{name}.py").write_text("")
    (pkg / "backends" / "memory.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import arqd.model\n"
        "from . import base\n"
        "from arqd import core\n"
        "if TYPE_CHECKING:\n"
        "    from arqd.http.server import App\n"
        "def later():\n"
        "    from prometheus_client import Counter\n"
        "    from aiohttp import web\n"
    )
    found = arrows(pkg)["arqd.backends.memory"]
    assert found == {
        "arqd.model",
        "arqd.backends.base",
        "arqd.core",
        "arqd.http.server",
        "prometheus_client",
        "aiohttp.web",
    }


def test_the_http_client_loads_no_core():
    """``import arqd.http.client`` loads the model, the views and the wire format only: not the
    core, the hub, metrics, handlers, a backend or prometheus_client."""
    code = "import sys, arqd.http.client; print(*sorted(sys.modules))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert run.returncode == 0, run.stderr
    loaded = set(run.stdout.split())
    assert "arqd.http.client" in loaded
    ours = {m for m in loaded if _ours(m)}
    above = {m for m in ours if layer_of(m) != MODEL} - {"arqd", "arqd.http", "arqd.http.client"}
    assert above == set()
    assert not {"arqd.core", "arqd.hub", "arqd.metrics", "arqd.handlers"} & loaded
    assert "prometheus_client" not in loaded
