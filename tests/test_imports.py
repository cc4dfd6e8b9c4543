"""The import graph between the repository's packages runs one way (PLAN, "Layout"):
training → registry → serving → spool → sidecar → MLflow, with ``stack`` (the CLI layer and
the local stack) on top of everything and ``model`` (which ships inside every logged model)
under everything.

Every module of every package is parsed with ``ast`` (nothing is imported, so a module that
would fail to import is still checked), and every ``import`` statement in it, at module level
or inside a function, is held against ``ALLOWED``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_PACKAGES = {"tests", "benchmarks", "data", "deploy", "scripts", "build"}

ANYTHING = None
# What each package may import of the repository besides itself: whole packages, or single
# modules (``serving.spool_format``). ``ANYTHING``: no limit.
ALLOWED: dict[str, frozenset[str] | None] = {
    "model": frozenset(),
    "training": frozenset({"model"}),
    "serving": frozenset({"model"}),
    "logging_sidecar": frozenset({"model", "serving.spool_format"}),
    # logging_sidecar.settings: the records' experiment and its variable are the sidecar's.
    # logging_sidecar.stop_flag: the one stop request a signal handler may set, in both services.
    # training.profile: the reference profile, made at training and read by monitoring.
    "monitoring": frozenset(
        {
            "model",
            "training.profile",
            "logging_sidecar.reader",
            "logging_sidecar.records",
            "logging_sidecar.settings",
            "logging_sidecar.stop_flag",
        }
    ),
    # Issue 20: healing orchestrates: it reads records and outcomes, runs monitoring's windows,
    # trains and gates with training's own code. Nothing imports it but the CLI layer.
    "healing": frozenset(
        {"model", "training", "monitoring", "logging_sidecar.reader", "logging_sidecar.records"}
    ),
    "stack": ANYTHING,
}


def packages() -> list[str]:
    return sorted(
        path.parent.name
        for path in REPO.glob("*/__init__.py")
        if path.parent.name not in NOT_PACKAGES and not path.parent.name.startswith(".")
    )


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``module`` (dotted, e.g. ``training.cli``)
    imports; for ``from a.b import c`` that is ``a.b.c``, since ``c`` may be a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _allows(allowed: frozenset[str], name: str) -> bool:
    return any(name == entry or name.startswith(entry + ".") for entry in allowed)


def violations(package: str, module: str, source: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, name)`` of the imports of ``module`` (in ``package``) of another repository
    package that the layout does not allow."""
    allowed = ALLOWED[package]
    if allowed is ANYTHING:
        return []
    found = []
    for line, name in imported_modules(source, module):
        target = name.split(".")[0]
        if target == package or target not in known:
            continue  # itself, or not this repository's
        if _allows(allowed, name):
            continue
        found.append((line, name))
    return found


def test_every_package_has_a_place_in_the_layout():
    unknown = [name for name in packages() if name not in ALLOWED]
    assert not unknown, f"packages missing from ALLOWED (say what they may import): {unknown}"
    assert {"model", "training", "serving", "logging_sidecar", "stack"} <= set(packages())


def test_imports_follow_the_data_flow():
    known = set(packages())
    problems, modules = [], 0
    for package in sorted(known):
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            may = ", ".join(sorted(ALLOWED[package] or ())) or "nothing else of the repository"
            problems += [
                f"{path.relative_to(REPO)}:{line} imports {name} ({package} may import {may})"
                for line, name in violations(package, module, path.read_text(), known)
            ]
            modules += 1
    assert modules > 30, f"only {modules} modules found under {REPO}"
    assert not problems, "imports against the flow:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("training", "from serving.settings import MODEL_NAME", ["serving.settings.MODEL_NAME"]),
        ("training", "def f():\n    from stack import services", ["stack.services"]),
        ("serving", "import training.registry", ["training.registry"]),
        ("logging_sidecar", "from serving import capture", ["serving.capture"]),
        ("logging_sidecar", "from serving.spool_format import decode", []),
        ("logging_sidecar", "from serving import spool_format", []),
        ("model", "from training.data import DataError", ["training.data.DataError"]),
        ("model", "import numpy\nfrom model.schema import FEATURES", []),
        ("monitoring", "from logging_sidecar.reader import read_records", []),
        (
            "monitoring",
            "from logging_sidecar.shipper import RECORDS_DIR",
            ["logging_sidecar.shipper.RECORDS_DIR"],
        ),
        ("training", "from monitoring import window", ["monitoring.window"]),
        ("monitoring", "from training.profile import ReferenceProfile", []),
        ("monitoring", "from training.train import train", ["training.train.train"]),
        ("stack", "from training import registry\nfrom serving import server", []),
        ("healing", "from training.train import train_candidate\nfrom monitoring import window", []),
        ("healing", "from serving import follower", ["serving.follower"]),
        (
            "healing",
            "from logging_sidecar.shipper import RECORDS_DIR",
            ["logging_sidecar.shipper.RECORDS_DIR"],
        ),
    ],
)
def test_the_check_sees_imports_anywhere_in_a_module(package, source, expected):
    known = {"model", "training", "serving", "logging_sidecar", "monitoring", "healing", "stack"}
    assert [name for _, name in violations(package, f"{package}.example", source, known)] == expected


def test_relative_imports_are_resolved():
    assert imported_modules("from ..serving import capture", "training.sub.cli") == [
        (1, "training.serving.capture")
    ]
    assert imported_modules("from . import registry", "training.cli") == [(1, "training.registry")]
