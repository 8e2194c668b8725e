"""The house: a core you copy (sail_min/*.py) and a lab that verifies it (sail_min/lab/). The core never
imports the lab (the command line's dispatcher, __main__.py, hands the lab's toy task to cli.py), its modules import each other without a cycle, and no module reaches for another's private
name. Read from the source (AST), so the test needs no import."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "sail_min").glob("*.py") if p.name != "__main__.py")
LAB = sorted((ROOT / "sail_min" / "lab").glob("*.py"))


def sibling_imports(path: Path, package: str) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level?) of every import of a sail_min module in ``path``, resolved."""
    tree, found = ast.parse(path.read_text()), []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "sail_min" or module.startswith("sail_min."):
                found.append((module, [a.name for a in node.names], id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top_level) for a in node.names if a.name.startswith("sail_min")]
    return found


def test_the_core_never_imports_the_lab():
    offenders = [(p.name, module) for p in CORE for module, names, _ in sibling_imports(p, "sail_min")
                 if module == "sail_min.lab" or module.startswith("sail_min.lab.") or "lab" in names]
    assert offenders == []


def test_the_core_has_no_import_cycle():
    graph = {p.stem: {module.split(".")[1] for module, _, _ in sibling_imports(p, "sail_min") if module.count(".") == 1}
             for p in CORE}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert [name for name in graph if reaches(name, name)] == []


def test_no_private_name_crosses_a_module():
    offenders = [(p.relative_to(ROOT).as_posix(), module, name)
                 for p, package in [(p, "sail_min") for p in CORE] + [(p, "sail_min.lab") for p in LAB]
                 for module, names, _ in sibling_imports(p, package) for name in names
                 if name.startswith("_") and not name.startswith("__")]
    assert offenders == []


def test_the_lab_is_what_verifies_and_demonstrates():
    assert {p.stem for p in LAB} >= {"bandit", "fixed_points", "bandit_comparison", "check", "sentiment", "compare",
                                     "experiments"}
    assert not (ROOT / "sail_min" / "tasks").exists()
