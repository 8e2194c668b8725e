"""The notebooks' first cell on Colab: clone into /content/sail_min, install from inside the clone, fail
loudly, import sail_min from the clone, keep the preinstalled torch.

Colab is simulated: an empty working folder, an importable `google.colab`, the repository URL redirected to
this checkout by git's `url.<path>.insteadOf`, a scratch venv that sees this machine's packages (Colab's
preinstalled ones), and /content replaced by a temporary folder.
"""
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import colab_setup  # noqa: E402  (notebooks/colab_setup.py: the cell's one source)


def test_every_notebook_starts_with_the_one_setup_cell():
    notebooks = colab_setup.notebooks()
    assert len(notebooks) >= 6
    for path in notebooks:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        assert "".join(colab_setup.first_code_cell(notebook)["source"]) == colab_setup.setup_cell(), (
            f"{path.name}: first code cell differs from notebooks/colab_setup.py (run it to rewrite the cells)")
        badge = f"colab.research.google.com/github/sail-min/sail_min/blob/main/notebooks/{path.name}"
        assert badge in "".join(notebook["cells"][0]["source"]), f"{path.name}: Colab badge"


def colab_layout(tmp_path: Path) -> tuple[Path, Path, dict]:
    """(python of a scratch venv, an empty working folder, the environment) of a simulated Colab."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    fake = tmp_path / "fake_colab"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text("")
    work = tmp_path / "content"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(fake), PIP_DISABLE_PIP_VERSION_CHECK="1",
               GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"url.{ROOT}.insteadOf",
               GIT_CONFIG_VALUE_0=colab_setup.REPO_URL)
    return python, work, env


def run_cell(source: str, python: Path, work: Path, env: dict) -> subprocess.CompletedProcess:
    """The cell as Colab runs it (from `work`), then where sail_min, torch and the working folder are."""
    script = (source + "\nimport sail_min, torch, os\n"
              "print('SAIL_MIN_AT', os.path.dirname(sail_min.__file__))\n"
              "print('TORCH', torch.__version__)\nprint('CWD', os.getcwd())\n")
    return subprocess.run([str(python), "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)


def report(result: subprocess.CompletedProcess) -> dict:
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0] in
                ("SAIL_MIN_AT", "TORCH", "CWD"))


@pytest.mark.skipif(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode,
                    reason="needs a git checkout to clone")
def test_setup_cell_installs_from_the_clone_in_a_colab_layout(tmp_path):
    import torch
    python, work, env = colab_layout(tmp_path)
    clone = work / "sail_min"
    source = colab_setup.setup_cell().replace('"/content/sail_min"', repr(str(clone)))
    result = run_cell(source, python, work, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = report(result)
    assert Path(seen["SAIL_MIN_AT"]) == clone / "sail_min", seen          # imported from the clone
    assert seen["TORCH"] == torch.__version__, seen                        # the preinstalled torch, kept
    assert Path(seen["CWD"]) == clone / "notebooks", seen                  # notebooks' relative paths hold
    installed = subprocess.run([str(python), "-m", "pip", "show", "-f", "sail-min"], env=env,
                               capture_output=True, text=True)
    assert installed.returncode == 0 and str(clone) in installed.stdout, installed.stdout   # editable, the clone

    # a failed install stops the cell with pip's own words
    (clone / "requirements.txt").write_text("this-package-does-not-exist-sail-min==0.0.0\n")
    broken = run_cell(source, python, work, {**env, "PIP_NO_INDEX": "1"})
    assert broken.returncode != 0
    assert "pip install -r requirements.txt failed" in broken.stderr
    assert "this-package-does-not-exist-sail-min" in broken.stderr
