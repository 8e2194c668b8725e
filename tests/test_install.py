"""pyproject.toml: the package installs offline, ships every module, and its dependencies
are requirements.txt's runtime part (torch: the open range, which the pin satisfies)."""
import os
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirements_txt() -> tuple[list[Requirement], list[Requirement]]:
    """(runtime, test) requirements: the test part starts at the '# tests' comment."""
    runtime, test, part = [], [], "runtime"
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("# tests"):
            part = "test"
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-e "):            # the package itself, editable
            (runtime if part == "runtime" else test).append(Requirement(line))
    return runtime, test


def by_name(requirements) -> dict[str, Requirement]:
    requirements = list(requirements)
    names = [r.name.lower() for r in requirements]
    assert len(names) == len(set(names)), f"a package is listed twice: {names}"
    return dict(zip(names, requirements))


def test_pyproject_dependencies_mirror_requirements_txt():
    runtime, test = requirements_txt()
    assert {r.name for r in runtime} >= {"torch", "transformers", "datasets", "peft"}
    declared = by_name(Requirement(d) for d in PYPROJECT["project"]["dependencies"])
    assert set(declared) == {r.name.lower() for r in runtime}
    for required in runtime:
        ours = declared[required.name.lower()]
        pinned = [s.version for s in required.specifier if s.operator == "=="]
        if pinned:      # torch==2.13.0 on Python < 3.12: the package keeps the range, which holds it
            assert all(ours.specifier.contains(v) for v in pinned), (required, ours)
        else:
            assert ours.specifier == required.specifier and ours.marker is None, (required, ours)
    assert by_name(Requirement(d) for d in PYPROJECT["project"]["optional-dependencies"]["test"]) == by_name(test)


def test_project_metadata():
    project = PYPROJECT["project"]
    assert project["name"] == "sail-min" and project["requires-python"] == ">=3.10"
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    on_disk = sorted(str(p.parent.relative_to(ROOT)).replace(os.sep, ".") for p in (ROOT / "sail_min").rglob("__init__.py"))
    assert sorted(packages) == on_disk == ["sail_min", "sail_min.lab"]


def test_offline_install_ships_every_module_and_imports(tmp_path):
    """pip install --no-index --no-deps --no-build-isolation of a copy (so no build/ lands in the checkout)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sail_min", source / "sail_min", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                             "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
                             str(source)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    installed = sorted(p.relative_to(target).as_posix() for p in (target / "sail_min").rglob("*.py"))
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sail_min").rglob("*.py"))
    assert installed == shipped

    (dist_info,) = target.glob("sail_min-*.dist-info")
    metadata = Parser().parsestr((dist_info / "METADATA").read_text(encoding="utf-8"))
    import sail_min
    assert metadata["Name"] == "sail-min" and metadata["Version"] == sail_min.__version__
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    assert sorted(str(r) for r in requires if r.marker is None) == sorted(
        str(Requirement(d)) for d in PYPROJECT["project"]["dependencies"])

    where = subprocess.run([sys.executable, "-c", "import sail_min, sail_min.data; print(sail_min.__file__)"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).parent == target / "sail_min"
