"""Test-wide environment: offline, quiet, deterministic.

Set here (not by the user) so that a bare `pytest` never reaches a model hub and the
notebooks executed by nbval print exactly what was committed. Kernels started by nbval
inherit these variables because they are set before any kernel starts.
"""
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
# notebooks run in kernels whose working directory is notebooks/: make `import sail_min` work
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore:IProgress not found",
    # notebook 06 runs its rehearsal mode (the real configuration on offline Qwen-class stand-ins) unless
    # SAIL_MODE, or the older SAIL_SMOKE=1 (= smoke), says otherwise
    "SAIL_MODE": os.environ.get("SAIL_MODE") or ("smoke" if os.environ.get("SAIL_SMOKE") == "1" else "rehearsal"),
    "SAIL_HIDE_TIMINGS": "1",          # tables print "-" for wall times, so strict nbval can compare them
}.items():
    os.environ.setdefault(name, value)
