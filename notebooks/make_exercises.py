"""Write the student copies of the notebooks: notebooks/exercises/0N_*.ipynb, solutions removed.

    python notebooks/make_exercises.py            # (re)write every student copy
    python notebooks/make_exercises.py --check    # exit 1 if a student copy is missing or out of date

The convention (every notebook follows it; ``tests/test_exercises.py`` checks it):

* A **solution cell** carries the cell tag ``solution``. Its answer sits between a line ``# BEGIN SOLUTION``
  and a line ``# END SOLUTION``. In the student copy the block is replaced by its ``# stub: `` lines with the
  prefix removed (``# stub: return None  # your code: ...`` becomes ``return None  # your code: ...``, at the
  stub line's own indentation), or by ``...`` at the marker's indentation if the block has none. Lines outside
  the block (a ``def`` line, a docstring, a ``return``) are kept.
* A **checker cell** (tag ``checker``) follows each solution cell and prints one verdict per check, from the
  notebook's ``cmp``: ``NAME: correct``, ``NAME: not yet: <what to do>`` (no answer: the stub returned None), or
  ``NAME: WRONG (...): <a hint>``. It never raises, so a student copy runs top to bottom.
  An assert that the given solution passes ends with ``# solved only``: such lines are removed from the student
  copy (strict nbval checks the solved notebook with them).
* A **wrong-answer cell** (tag ``wrong-answer``) follows each checker cell: it feeds the checker at least one
  plausible wrong answer and asserts that the checker says WRONG. It must not use the learner's function.
* A cell tagged ``solved-only`` (e.g. other correct answers, checked to pass) is left out of the student copy.
* "Why" answers go in a collapsed ``<details><summary>...</summary> ... </details>`` block of a markdown cell.

In the student copy every output is cleared, relative links point one folder up (the copies live in
notebooks/exercises/), and the notebook's root search also looks two folders up.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
EXERCISES = NOTEBOOKS / "exercises"
BEGIN, END, STUB = "# BEGIN SOLUTION", "# END SOLUTION", "# stub: "
SOLUTION, CHECKER, WRONG_ANSWER, SOLVED_ONLY = "solution", "checker", "wrong-answer", "solved-only"
SOLVED_ONLY_LINE = "# solved only"
NOTE = ("> **Student copy** of [{name}](../{name}), written by `notebooks/make_exercises.py`: each cell tagged "
        "`solution` holds a stub. Fill it in, run the checker below it (it prints `correct`, `not yet` or `WRONG` "
        "with a hint), and compare with the solved notebook afterwards.\n\n")
LINK = re.compile(r"\]\((?!https?:|#|mailto:|/)([^)\s]+)\)")
ROOT_SEARCH = 'for root in (".", ".."):'


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def student_source(source: str, where: str = "a solution cell") -> str:
    """The student version of a solution cell's source: each BEGIN/END block replaced by its stub lines."""
    out, block, indent = [], None, ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if block is not None:
                raise ValueError(f"{where}: '{BEGIN}' inside another solution block")
            block, indent = [], line[: len(line) - len(line.lstrip())]
        elif stripped == END:
            if block is None:
                raise ValueError(f"{where}: '{END}' without '{BEGIN}'")
            stubs = [l[: len(l) - len(l.lstrip())] + l.lstrip()[len(STUB):] for l in block if l.lstrip().startswith(STUB)]
            out.extend(stubs or [indent + "..."])
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"{where}: '{BEGIN}' without '{END}'")
    if source.count(BEGIN) == 0:
        raise ValueError(f"{where} is tagged '{SOLUTION}' but has no '{BEGIN}' ... '{END}' block")
    return "\n".join(out)


def has_solutions(nb) -> bool:
    return any(SOLUTION in tags(cell) for cell in nb.cells)


def student_notebook(nb, name: str):
    """A copy of the solved notebook ``nb`` (file name ``name``) with the solutions stubbed and outputs cleared."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    nb.cells = [cell for cell in nb.cells if SOLVED_ONLY not in tags(cell)]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = LINK.sub(lambda m: f"](../{m.group(1)})", cell.source)
            if i == 0:
                cell.source = NOTE.format(name=name) + cell.source
            continue
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
        cell.source = cell.source.replace(ROOT_SEARCH, 'for root in (".", "..", "../.."):')
        cell.source = "\n".join(l for l in cell.source.splitlines() if not l.rstrip().endswith(SOLVED_ONLY_LINE))
        if SOLUTION in tags(cell):
            cell.source = student_source(cell.source, f"{name} cell {i}")
    return nb


def student_copies(notebooks: Path = NOTEBOOKS) -> dict[str, str]:
    """{file name: student copy as JSON text} for every numbered notebook with solution cells."""
    copies = {}
    for path in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if has_solutions(nb):
            copies[path.name] = nbformat.writes(student_notebook(nb, path.name)) + "\n"
    return copies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the student copies are up to date")
    args = parser.parse_args(argv)
    copies = student_copies()
    stale = sorted(p.name for p in EXERCISES.glob("*.ipynb") if p.name not in copies)
    changed = [name for name, text in copies.items()
               if not (EXERCISES / name).exists() or (EXERCISES / name).read_text(encoding="utf-8") != text]
    if args.check:
        for name in changed:
            print(f"out of date: exercises/{name} (run python notebooks/make_exercises.py)")
        for name in stale:
            print(f"no solved notebook with solution cells for exercises/{name}")
        return 1 if changed or stale else 0
    EXERCISES.mkdir(exist_ok=True)
    for name in changed:
        (EXERCISES / name).write_text(copies[name], encoding="utf-8")
    for name in stale:
        (EXERCISES / name).unlink()
    print(f"{len(copies)} student copies in {EXERCISES} ({len(changed)} written, {len(stale)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
