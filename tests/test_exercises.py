"""The exercises: student copies in sync with the solved notebooks, and checkers that say what to do.

The convention is in ``notebooks/make_exercises.py``: solution cells (tag ``solution``), each followed by a checker
cell (``checker``) and a wrong-answer cell (``wrong-answer``). The solved notebooks run under strict nbval, where each
checker asserts (a ``# solved only`` line) that the given solution passes; here each student copy is executed, up to
its last exercise cell, and every checker must reject the stub with a message that says what to do, and every
wrong-answer cell must still be caught with a hint.
"""
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import make_exercises as mx  # noqa: E402

SOLVED = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
                if mx.has_solutions(nbformat.read(p, as_version=4)))
CORRECT = re.compile(r": correct\b")
NOT_YET = re.compile(r"not yet: (.*)")
WRONG = re.compile(r"WRONG\b(.*)")


def text_of(outputs) -> str:
    """Everything a cell printed or displayed as text."""
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def exercise_cells(nb):
    """[(index, kind)] of the cells tagged solution / checker / wrong-answer, in order."""
    kinds = (mx.SOLUTION, mx.CHECKER, mx.WRONG_ANSWER)
    return [(i, kind) for i, cell in enumerate(nb.cells) for kind in kinds if kind in mx.tags(cell)]


def test_some_notebooks_have_exercises():
    assert {"01_sail_objective.ipynb", "03_logprobs_and_sampling.ipynb", "04_preference_labels.ipynb"} <= set(SOLVED)


def test_student_copies_are_in_sync():
    copies = mx.student_copies()
    assert sorted(copies) == SOLVED
    on_disk = sorted(p.name for p in (ROOT / "notebooks" / "exercises").glob("*.ipynb"))
    assert on_disk == SOLVED, "run python notebooks/make_exercises.py"
    for name, text in copies.items():
        assert (ROOT / "notebooks" / "exercises" / name).read_text(encoding="utf-8") == text, \
            f"exercises/{name} is out of date: run python notebooks/make_exercises.py"


def test_student_source_stubs_the_block_and_keeps_the_rest():
    source = ("def f(x):\n    \"\"\"doc\"\"\"\n    # BEGIN SOLUTION\n    # stub: return None  # your code\n"
              "    y = x + 1\n    return y\n    # END SOLUTION\n")
    assert mx.student_source(source) == "def f(x):\n    \"\"\"doc\"\"\"\n    return None  # your code"
    assert mx.student_source("def g():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n    pass") == \
        "def g():\n    ...\n    pass"
    for broken in ("x = 1", "# BEGIN SOLUTION\nx = 1", "x = 1\n# END SOLUTION", "# BEGIN SOLUTION\n# BEGIN SOLUTION"):
        with pytest.raises(ValueError):
            mx.student_source(broken, "cell")


def test_a_student_copy_has_no_solution_left():
    for name in SOLVED:
        solved = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        student = nbformat.read(ROOT / "notebooks" / "exercises" / name, as_version=4)
        answers = ["\n".join(line for line in cell.source.split(mx.BEGIN, 1)[1].split(mx.END, 1)[0].splitlines()
                             if line.strip() and not line.lstrip().startswith(mx.STUB))
                   for cell in solved.cells if mx.SOLUTION in mx.tags(cell)]
        text = "\n".join(cell.source for cell in student.cells)
        assert all(answer not in text for answer in answers), name
        assert mx.SOLVED_ONLY_LINE not in text and all(not c.get("outputs") for c in student.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", SOLVED)
def test_each_solution_has_a_checker_and_a_wrong_answer(name):
    """solution+ -> checker -> wrong-answer, in that order; the checker asserts (solved only) that the solution passes;
    the committed outputs of the solved notebook say correct, and the wrong answers say WRONG."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    order = [kind for _, kind in exercise_cells(nb)]
    pattern = f"(({mx.SOLUTION},)+{mx.CHECKER},{mx.WRONG_ANSWER},)+"
    assert re.fullmatch(pattern, ",".join(order) + ","), f"{name}: exercise cells in the order {order}"
    for i, kind in exercise_cells(nb):
        cell, printed = nb.cells[i], text_of(nb.cells[i].outputs)
        if kind == mx.CHECKER:
            assert re.search(r"^assert .*# solved only$", cell.source, re.M), f"{name} cell {i}: no '# solved only' assert"
            assert CORRECT.search(printed) and "WRONG" not in printed and "not yet" not in printed, (name, i, printed)
        if kind == mx.WRONG_ANSWER:
            assert "WRONG" in printed, (name, i, printed)


def execute(nb, cwd: Path, timeout: float = 180) -> list[tuple[str, list]]:
    """Run the code cells of ``nb`` in a fresh kernel of this Python; [(text printed, error outputs)] per cell."""
    from nbval.kernel import CURRENT_ENV_KERNEL_NAME, start_new_kernel
    km, kc = start_new_kernel(kernel_name=CURRENT_ENV_KERNEL_NAME, cwd=str(cwd))
    results = []
    try:
        for cell in nb.cells:
            outputs = []

            def hook(msg, outputs=outputs):
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    outputs.append({"output_type": "stream", "text": content["text"]})
                elif kind in ("execute_result", "display_data"):
                    outputs.append({"output_type": kind, "data": content["data"]})
                elif kind == "error":
                    outputs.append({"output_type": "error", "ename": content["ename"], "evalue": content["evalue"]})
            if cell.cell_type == "code":
                kc.execute_interactive(cell.source, output_hook=hook, timeout=timeout)
            results.append((text_of(outputs), [o for o in outputs if o["output_type"] == "error"]))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return results


@pytest.mark.parametrize("name", SOLVED)
def test_student_copy_runs_and_every_checker_says_what_to_do(name):
    """The student copy, run up to its last exercise cell (from notebooks/exercises/, as a learner would): no cell
    raises; each checker says `not yet: <what to do>` (never `correct`); each wrong answer is still caught, with a
    hint after WRONG."""
    nb = nbformat.read(ROOT / "notebooks" / "exercises" / name, as_version=4)
    cells = exercise_cells(nb)
    nb.cells = nb.cells[: cells[-1][0] + 1]
    start = time.perf_counter()
    results = execute(nb, ROOT / "notebooks" / "exercises")
    for i, (printed, errors) in enumerate(results):
        assert not errors, f"{name} cell {i} raised {errors[0]['ename']}: {errors[0]['evalue']}"
    for i, kind in cells:
        printed = results[i][0]
        if kind == mx.CHECKER:
            assert not CORRECT.search(printed) and NOT_YET.search(printed), (name, i, printed)
            assert all(len(todo.strip()) >= 20 for todo in NOT_YET.findall(printed)), (name, i, printed)
        if kind == mx.WRONG_ANSWER:
            assert WRONG.search(printed) and all(len(hint) >= 20 for hint in WRONG.findall(printed)), (name, i, printed)
    print(f"{name}: student copy ran in {time.perf_counter() - start:.1f} s")
