"""The repository as a reader meets it: the documents name only functions that exist, no file points
outside the repository, no two project files import each other (directly or round a loop) or use
each other's private names, and every option of every entry point has help."""
import argparse
import ast
import importlib
import importlib.util
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
ENTRY_POINTS = ("grpo", "evaluate", "mgiqa", "demo", "data", "reward", "synth", "tiny", "scripts/bench.py",
                "scripts/gpu_check.py", "scripts/fit.py", "scripts/probe.py")


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if os.path.isfile(os.path.join(ROOT, f))]


@pytest.mark.parametrize("doc", ["docs/METHOD.md", "README.md"])
def test_documents_name_only_what_exists(doc):
    text = open(os.path.join(ROOT, doc)).read()
    names = set(re.findall(r"`([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_]+))?", text))
    names = {n for n in names if n[0] in MODULES and n[1] != "py"}
    assert len(names) > (40 if "METHOD" in doc else 15)
    missing = []
    for module, attr, sub in sorted(names):
        obj = getattr(importlib.import_module(module), attr, None)
        if obj is None or (sub and not hasattr(obj, sub)):
            missing.append(f"{module}.{attr}" + (f".{sub}" if sub else ""))
    assert not missing, missing


def test_no_file_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|PITFALLS\.md|SPEC\.md|\bSPEC [0-9]|\bissues? #?[0-9]+\b", re.IGNORECASE)
    hits = []
    for f in tracked_files():
        if f.endswith((".png", ".jpg")) or (f.startswith("tests/fixtures/") and not f.endswith(".md")):  # data
            continue
        for number, line in enumerate(open(os.path.join(ROOT, f), errors="replace"), 1):
            if pattern.search(line) and f != "tests/test_docs.py":
                hits.append(f"{f}:{number}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits)


def project_imports(module) -> set[str]:
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
    found = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def test_no_file_uses_another_files_private_names():
    hits = []
    for module in MODULES:
        tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in MODULES
                    and node.value.id != module and node.attr.startswith("_")):
                hits.append(f"{module}.py:{node.lineno}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in MODULES:
                hits += [f"{module}.py:{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not hits, hits


def test_no_import_cycle_between_project_files():
    graph = {m: project_imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_flag_has_help(module, monkeypatch):
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    if module.endswith(".py"):  # a script in scripts/
        spec = importlib.util.spec_from_file_location(module.replace("/", "_")[:-3], os.path.join(ROOT, module))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    for name in ("parse_args", "main"):
        if hasattr(mod, name):
            try:
                getattr(mod, name)([])
            except SystemExit:
                pass
            except TypeError:
                continue
            if parsers:
                break
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
    assert parsers, f"{module}: no argument parser found"
    bare = [a.option_strings or [a.dest] for p in parsers for a in p._actions
            if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert not bare, f"{module}: flags without help: {bare}"
