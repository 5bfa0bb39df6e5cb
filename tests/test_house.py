"""The house's own rules, checked on the files themselves: no import circle among the project's
modules, the launching commands load without torch, one-line errors, one atomic JSON writer."""
import ast
import json
import os
import subprocess
import sys

import pytest

import files
from conftest import ROOT

MODULES = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def imports_of(name):
    """The project modules `name`.py imports anywhere in the file (a function's lazy import included)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found & MODULES - {name}


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}

    def visit(m, path):  # depth-first: a module met again on the current path closes a circle
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    assert graph["bench"] >= {"gpu_check", "measure"} and "bench" not in graph["gpu_check"]


@pytest.mark.parametrize("module", ["ablate", "config", "files", "trackers"])
def test_the_launching_modules_load_without_torch(module):
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_first_line_takes_the_first_line_or_the_type_and_bounds_it():
    assert files.first_line(ValueError("bad value\nTraceback detail")) == "bad value"
    assert files.first_line(KeyError()) == "KeyError"          # an empty message names its type
    assert files.first_line(RuntimeError("  \n  ")) == "RuntimeError"
    assert files.first_line(OSError("x" * 500)) == "x" * 200


def test_why_names_a_full_disk(tmp_path):
    import errno
    assert files.reason_of(OSError(errno.ENOSPC, "No space left on device")) == "disk full"
    assert files.reason_of(OSError(errno.EACCES, "Permission denied")) == "Permission denied"
    assert files.reason_of(ValueError("one\ntwo")) == "one"


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "x.json")
    files.write_json({"a": [1, 2]}, path)
    files.write_json({"b": 1}, path, indent=1)
    assert json.loads(open(path).read()) == {"b": 1} and open(path).read() == '{\n "b": 1\n}'
    assert os.listdir(tmp_path / "sub") == ["x.json"]

    class Unwritable:
        pass
    with pytest.raises(TypeError):  # a failed dump leaves the old file as it was
        files.write_json({"c": Unwritable()}, path)
    assert json.loads(open(path).read()) == {"b": 1} and os.listdir(tmp_path / "sub") == ["x.json"]
