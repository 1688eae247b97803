"""The layout holds: the processes' packages never import each other, providers and the shared
modules at the top of service/ stay apart from the processes, and development tools stay out of
the runtime, the wheel and the image."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "service"


def module_name(path: Path, repo: Path = REPO) -> str:
    parts = path.relative_to(repo).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(tree: ast.AST, *, in_functions: bool) -> Iterator[ast.AST]:
    """Every node of ``tree``; without ``in_functions``, none inside a function's body."""
    if in_functions:
        yield from ast.walk(tree)
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [
            child
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        ]


def imported(path: Path, repo: Path, *, in_functions: bool = True) -> Iterator[str]:
    """Every module ``path`` imports, wherever the import sits (functions included unless
    ``in_functions`` is false), and every constant ``importlib.import_module`` names."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path, repo)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in _nodes(tree, in_functions=in_functions):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = (package or name).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (importer, imported): a module in the first package must never import the second.
FORBIDDEN = [
    ("service.ingest", "service.consume"),
    ("service.consume", "service.ingest"),
    ("service.providers", "service.ingest"),
    ("service.providers", "service.consume"),
    ("service.recover", "service.ingest"),
    ("service.recover", "service.consume"),
    ("service.ingest", "service.recover"),
    ("service.consume", "service.recover"),
    ("service.providers", "service.recover"),
    ("service", "devtools"),
]

PROCESSES = ("service.ingest", "service.consume", "service.recover")
# What the operator runs loads a process's package, but only inside the command that needs it,
# so no shared module depends on a process's package at import time.
LAZY = ("service.cli", "service.commands")


def _shared(module: str) -> bool:
    """A module the processes share: at the top of service/ or among the operator's commands
    (providers have their own rules above)."""
    return not any(within(module, p) for p in (*PROCESSES, "service.providers"))


def violations(repo: Path) -> list[str]:
    found = []
    for path in sorted((repo / "service").rglob("*.py")):
        importer = module_name(path, repo)
        for target in imported(path, repo):
            for source, forbidden in FORBIDDEN:
                if within(importer, source) and within(target, forbidden):
                    found.append(f"{importer} imports {target}")
        if _shared(importer):
            lazy = any(within(importer, p) for p in LAZY)
            for target in imported(path, repo, in_functions=not lazy):
                if any(within(target, p) for p in PROCESSES):
                    found.append(f"{importer} imports {target}")
    return found


def test_process_packages_providers_and_devtools_keep_apart() -> None:
    assert violations(REPO) == []


def test_the_import_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The walk above finds what it must: plain, from, relative, in-function and importlib."""
    fake = tmp_path / "service"
    (fake / "ingest").mkdir(parents=True)
    (fake / "providers").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "ingest" / "__init__.py").write_text("")
    (fake / "providers" / "__init__.py").write_text("")
    (fake / "ingest" / "app.py").write_text(
        "import service.consume.pipeline\n"
        "from ..consume import supervisor\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('service.consume.process')\n"
    )
    (fake / "providers" / "x.py").write_text("from service.ingest.app import f\n")
    (fake / "tools.py").write_text("from devtools.devbroker import LocalBroker\n")
    (fake / "store.py").write_text("def f():\n    from service.consume.reconcile import apply\n")
    (fake / "commands").mkdir()
    (fake / "commands" / "__init__.py").write_text("")
    (fake / "commands" / "spool.py").write_text(
        "from service.ingest.spool import Spool\n"
        "def drain():\n"
        "    from service.ingest.spool import inspect\n"
    )
    (fake / "cli.py").write_text(
        "import importlib\ndef serve():\n    importlib.import_module('service.recover.process')\n"
    )
    found = violations(tmp_path)
    assert "service.ingest.app imports service.consume.pipeline" in found
    assert "service.ingest.app imports service.consume.supervisor" in found
    assert "service.ingest.app imports service.consume.process" in found
    assert "service.providers.x imports service.ingest.app" in found
    assert "service.tools imports devtools.devbroker" in found
    assert "service.store imports service.consume.reconcile.apply" in found
    assert "service.commands.spool imports service.ingest.spool.Spool" in found
    assert "service.commands.spool imports service.ingest.spool.inspect" not in found
    assert not [line for line in found if line.startswith("service.cli ")]


def test_the_wheel_holds_no_development_module(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for package in ("service", "schemas", "devtools"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(tmp_path / "out"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "out").glob("payhook-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"service", "schemas", "payhook-0.1.0.dist-info"}
    assert "service/ingest/app.py" in names
    assert "service/providers/bitfinex.py" in names
    assert not [name for name in names if "devtools" in name or "devbroker" in name]


def test_the_image_copies_no_development_module() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    copied = [
        source
        for line in dockerfile.splitlines()
        if (match := re.match(r"\s*(?:COPY|ADD)\s+(.*)", line)) and "--from=" not in match.group(1)
        for source in match.group(1).split()[:-1]
    ]
    assert copied, "found no COPY line"
    assert not [source for source in copied if "devtools" in source or source in (".", "./")]
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context starts from nothing"
    assert not [line for line in ignore if line.startswith("!") and "devtools" in line]


@pytest.mark.parametrize("path", sorted(SERVICE.rglob("*.py")), ids=lambda p: module_name(p))
def test_every_runtime_module_says_why_it_exists(path: Path) -> None:
    if path.name == "__init__.py" and path.parent == SERVICE:
        return
    assert ast.get_docstring(ast.parse(path.read_text())), module_name(path)
