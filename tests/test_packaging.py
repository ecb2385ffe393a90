"""Packaging: every third-party import under src/ is a declared dependency or in the deploy extra (and every
dependency is used), the Python floor covers the dependencies', and the configs ship inside the package (found by
importlib.resources, naming each other by relative path), with `configs/` in a checkout a link to them."""
import ast
import fnmatch
import re
import sys
import tomllib
from importlib import metadata

from conftest import REPO
from yolc_kd.config import load_config
from yolc_kd.demo import CONFIGS

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE = REPO / "src" / "yolc_kd"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level() -> set:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if "configs" in path.relative_to(PACKAGE).parts:
            continue  # config files are user code executed by load_config, not imported
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"yolc_kd", "__future__"}


def test_third_party_imports_are_exactly_the_declared_dependencies():
    dists = metadata.packages_distributions()
    imported = {_name(dists[m][0]) for m in _imported_top_level()}
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    deploy = {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["deploy"]}  # yolc_kd.deploy's extra
    assert imported - deploy == declared, f"imported but not declared: {imported - deploy - declared}; " \
                                          f"declared but not imported: {declared - imported}"


def test_python_floor_covers_every_dependency():
    floor = tuple(int(x) for x in re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups())
    assert sys.version_info[:2] >= floor
    for req in PYPROJECT["project"]["dependencies"]:
        needs = metadata.metadata(_name(req)).get("Requires-Python") or ""
        for major, minor in re.findall(r">=\s*(\d+)\.(\d+)", needs):
            assert (int(major), int(minor)) <= floor, f"{_name(req)} needs Python {needs}, pyproject says {floor}"


def test_configs_ship_in_the_package_and_resolve_each_other():
    assert CONFIGS is not None and CONFIGS.resolve() == (PACKAGE / "configs").resolve()
    shipped = sorted(p.name for p in CONFIGS.glob("*.py"))
    assert "tiny_student_synth.py" in shipped and "yolc_hrnet_w48_visdrone.py" in shipped
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["yolc_kd"]
    assert all(any(fnmatch.fnmatch(f"configs/{n}", g) for g in globs) for n in shipped)
    teacher = load_config(CONFIGS / "tiny_student_synth.py")["distill"].teacher_config
    assert teacher == str((CONFIGS / "tiny_teacher_synth.py").resolve())
    link = REPO / "configs"
    assert link.is_symlink() and link.resolve() == CONFIGS.resolve()
