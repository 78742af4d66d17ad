"""dvc.yaml's code deps: each stage lists exactly the project modules its command imports, so that
editing one reruns the stage (a missing dep leaves stale results that `dvc status` calls clean).

The expected lists are computed from the code on every run, never written down, so the test keeps
holding as modules come and go."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("segpipe", "tasks")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str, root: Path) -> Path | None:
    """The project source of module `name` under `root`, or None for a third-party module or a name
    that is no module (an attribute taken by `from package import name`)."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*parts)
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def executed_modules(name: str) -> list[str]:
    """Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` before `a/b/c.py`."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name that `module` (the source `path`) may import, anywhere in its code: inside
    functions too, since a lazy import runs the module all the same. `from x import y` yields both
    `x` and `x.y`, since y may be a submodule; names that are not modules find no file later."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """The project files (paths relative to `root`) that running `module` executes."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        for name in executed_modules(pending.pop()):
            path = module_file(name, root)
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(imported_names(path, name))
    return {path.relative_to(root).as_posix() for path in seen}


def stage_body(stage: dict) -> dict:
    """A `foreach` stage keeps its cmd and deps under `do:`; a plain or `matrix` stage at its top."""
    return stage.get("do", stage)


def command_module(cmd: str) -> str:
    return re.search(r"python -m (\S+)", cmd).group(1)


def listed_code_deps(deps: list[str]) -> set[str]:
    """The deps that are project sources. A templated one (`segpipe/datasets/${key}.py`) is kept
    as written and so reported as extra: every instance of a stage runs the same module, hence
    imports the same files, so its code deps are plain paths."""
    return {dep for dep in deps if dep.split("/")[0] in PROJECT_PACKAGES and dep.endswith(".py")}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_lists_exactly_the_project_modules_its_command_imports(name):
    body = stage_body(STAGES[name])
    module = command_module(body["cmd"])
    closure, listed = import_closure(module), listed_code_deps(body["deps"])
    missing, extra = sorted(closure - listed), sorted(listed - closure)
    assert not missing and not extra, (
        f"dvc.yaml stage {name!r}: its code deps differ from the project files that {module} imports; "
        f"missing: {missing}; extra: {extra}"
    )


def test_the_closure_follows_indirect_imports_and_package_inits_but_not_other_stages():
    closure = import_closure("tasks.train")
    assert {"tasks/train.py", "tasks/__init__.py", "segpipe/__init__.py", "segpipe/store.py"} <= closure
    assert "tasks/ingest.py" not in closure


def test_the_closure_follows_relative_lazy_and_from_package_imports_and_ignores_third_party(tmp_path):
    sources = {
        "segpipe/__init__.py": "",
        "segpipe/a.py": "import numpy\nfrom . import b\n\ndef lazy():\n    from segpipe.sub import c\n",
        "segpipe/b.py": "from .sub.d import VALUE\n",
        "segpipe/sub/__init__.py": "",
        "segpipe/sub/c.py": "",
        "segpipe/sub/d.py": "VALUE = 1\n",
        "segpipe/unused.py": "",
    }
    for rel, text in sources.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure("segpipe.a", tmp_path) == set(sources) - {"segpipe/unused.py"}
