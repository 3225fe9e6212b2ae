"""The repository root is the package: each project module is loaded once, under the one name its path spells.

A second name for one file (say `tools.bench` beside `executorch_wgpu.tools.bench`,
from a path entry that reaches into the repository) means two copies of every
global in it -- two kernel registries, two GPU contexts -- and bugs that show only
in some import orders. And tests share through conftest fixtures and the package,
never by importing each other (which needs tests/ on sys.path: another name space).
"""

import ast
import importlib
import os
import pkgutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import executorch_wgpu

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# Inside the checkout but not the project's: the virtual environment and build outputs.
NOT_PROJECT = (REPO / ".venv", REPO / "build")
# Folders of the repository (and the old test helper module) that must never be top-level modules.
TOP_LEVEL_NAMES = ("backend", "runtime_py", "runtime_native", "tools", "shaders", "helpers", "errors", "native",
                   "runtime")


def import_every_package_module() -> list:
    names = []
    for info in pkgutil.walk_packages(executorch_wgpu.__path__, "executorch_wgpu."):
        importlib.import_module(info.name)
        names.append(info.name)
    return names


def project_file(module) -> Optional[Path]:
    """The real path of a module's file when it is one of the project's files, else None."""
    file = getattr(module, "__file__", None)
    if not file or not os.path.isabs(file):   # torch.ops and torch.classes carry a bare "_ops.py"-like name
        return None
    path = Path(os.path.realpath(file))
    if not path.is_relative_to(REPO) or any(path.is_relative_to(other) for other in NOT_PROJECT):
        return None
    return path


def name_its_path_spells(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["executorch_wgpu", *parts])


def test_the_package_is_the_repository_root():
    assert Path(os.path.realpath(executorch_wgpu.__file__)) == REPO / "__init__.py"


def test_every_package_module_imports_and_is_loaded_once_under_the_name_its_path_spells():
    imported = import_every_package_module()
    assert {"executorch_wgpu.tools.reference", "executorch_wgpu.runtime_py.gpu", "executorch_wgpu.backend.routing",
            "executorch_wgpu.shaders.registry", "executorch_wgpu.runtime"} <= set(imported)
    names_by_file = defaultdict(list)
    for name, module in list(sys.modules.items()):
        path = project_file(module)
        if path is not None:
            names_by_file[path].append(name)
    loaded_twice = {str(path): names for path, names in names_by_file.items() if len(names) > 1}
    assert not loaded_twice, f"files loaded under more than one module name: {loaded_twice}"
    misnamed = {names[0]: name_its_path_spells(path) for path, names in names_by_file.items()
                if not path.is_relative_to(TESTS) and names[0] != name_its_path_spells(path)}
    assert not misnamed, f"modules loaded under another name than their path spells (name: expected): {misnamed}"


def test_no_repository_folder_is_loaded_as_a_top_level_module():
    import_every_package_module()
    from_repo = {name: str(project_file(sys.modules[name])) for name in TOP_LEVEL_NAMES
                 if name in sys.modules and project_file(sys.modules[name]) is not None}
    assert not from_repo, f"top-level modules loaded from the repository: {from_repo}"


def test_test_modules_import_no_other_test_module_nor_conftest():
    test_modules = {p.stem for p in TESTS.glob("*.py")} | {"helpers"}
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module]
            elif isinstance(node, ast.ImportFrom):   # relative: tests/ is no package
                imported = ["." * node.level + (node.module or "")]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in imported
                          if name.split(".")[0] in test_modules or name.startswith(".")]
    assert not offenders, offenders
