"""The first code cell of every notebook, kept here once.

On Colab it clones the repository into /content/sail_min, installs it from inside the clone (pip resolves
the `-e .` of requirements.txt against the working directory, so it must run there), stops with pip's own
output if the install fails, and imports `sail_min` from the clone. Colab's preinstalled torch is kept:
on Python >= 3.12 requirements.txt asks only for `torch>=2.4`. Elsewhere (after the README's
`pip install -r requirements.txt`) the cell does nothing.

A fork changes REPO_URL below (the one place the URL is written, badges aside) and runs

    python notebooks/colab_setup.py

which writes this cell into every notebook's first code cell and points the Colab badges at the fork.
tests/test_colab.py checks that every notebook holds this cell and runs it in a simulated Colab layout.
"""
import json
import re
import sys
from pathlib import Path

REPO_URL = "https://github.com/sail-min/sail_min"

CELL = '''\
# Setup: on Colab, clone this repository into /content/sail_min and install it there (Colab's torch is kept).
# Elsewhere nothing happens: `pip install -r requirements.txt` (README) has installed sail_min already.
import importlib.util, os, subprocess, sys
REPO_URL = "{url}"   # one constant: notebooks/colab_setup.py writes it into every notebook
if importlib.util.find_spec("google") and importlib.util.find_spec("google.colab"):
    CLONE = "/content/sail_min"
    if not os.path.isdir(CLONE):
        subprocess.run(["git", "clone", "--quiet", REPO_URL, CLONE], check=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", "requirements.txt"],
                         cwd=CLONE, capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install -r requirements.txt failed in {{CLONE}}:\\n{{pip.stdout}}{{pip.stderr}}")
    sys.path.insert(0, CLONE)
    os.chdir(os.path.join(CLONE, "notebooks"))
    import sail_min
    print(f"sail_min {{sail_min.__version__}} installed from {{os.path.dirname(sail_min.__file__)}}")'''


def setup_cell(url: str = REPO_URL) -> str:
    """The setup cell's source for a repository URL."""
    return CELL.format(url=url)


def notebooks() -> list[Path]:
    return sorted(Path(__file__).resolve().parent.glob("[0-9][0-9]_*.ipynb"))


def first_code_cell(notebook: dict) -> dict:
    return next(c for c in notebook["cells"] if c["cell_type"] == "code")


def sync(url: str = REPO_URL) -> None:
    """Write the setup cell into every notebook's first code cell and the badges' links to `url`."""
    github_path = re.sub(r"^https://github\.com/", "", url).removesuffix(".git")
    for path in notebooks():
        notebook = json.loads(path.read_text(encoding="utf-8"))
        first_code_cell(notebook)["source"] = setup_cell(url).splitlines(keepends=True)
        for cell in notebook["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"])
                text = re.sub(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/",
                              f"colab.research.google.com/github/{github_path}/blob/", text)
                cell["source"] = text.splitlines(keepends=True)
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path.name}: setup cell and badge -> {url}")


if __name__ == "__main__":
    sync(sys.argv[1] if len(sys.argv) > 1 else REPO_URL)
