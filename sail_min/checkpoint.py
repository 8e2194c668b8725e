"""Resumable checkpoints of a training run: save, load safely, restore.

A checkpoint is one ``torch.save`` file holding a dict of plain containers and tensors only:

    format      "sail_min.checkpoint/1" (marks the file as ours)
    model       {name: tensor} of the TRAINABLE weights (``p.requires_grad``; LoRA: the
                adapters): frozen weights never change, so they are not copied again
    optimizer   ``optimizer.state_dict()``
    scaler      ``GradScaler.state_dict()`` (fp16 loss scaling), or None
    next_step   the step a resumed run starts with
    counters    {name: number} the loop accumulates (skipped steps, judge queries, ...)
    config      the run's settings as a dict of plain types (``dataclasses.asdict(config)``)
    fingerprint {"data": ..., "weights": ...}: digests of the training data and of the model's weights at
                the start (``train.run_fingerprint``), so a resume with other data or another model is
                refused (absent in checkpoints of older versions: not checked)

Loading uses ``torch.load(weights_only=True)``: unpickling a file can run arbitrary code,
and the restricted unpickler builds only tensors and plain containers, so a file from
elsewhere is refused before anything in it runs. Nothing is allow-listed beyond the
defaults. Every problem with a file is a ``CheckpointError`` that names the file and says
what to do; a file that is intact but cannot be loaded here is never called corrupt. The file is
read onto the CPU and copied into the model (``map_location="cpu"``: under torchrun on a CPU the
run's device is ``cpu:0``, which ``torch.load`` cannot map to). Writing is atomic (a temporary
file, then ``os.replace``): a run killed while saving keeps its previous checkpoint, and the
temporary file a SIGKILL leaves is removed by the next run (``remove_stray_temporaries``). A
failed write (a full disk, a read-only folder) is a ``CheckpointWriteError`` (an ``OSError``)
naming the file and the system's reason.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT = "sail_min.checkpoint/1"
"""The value of the ``"format"`` key of every checkpoint this module writes."""

RESUMABLE_CHANGES = ("steps", "output_dir", "eval_every", "checkpoint_every", "judge_timeout_s")
"""Settings a resumed run may change: how long it runs, how often it evaluates and saves, how long it waits
for the judge."""

FINGERPRINTED = {"data": "training data (preferences, training and evaluation prompts)",
                 "weights": "starting weights (the model as it was before the first step)"}
"""What a checkpoint's fingerprint covers; the judge is not in it: a resumed run may change its judge."""

_KEYS = ("format", "model", "optimizer", "scaler", "next_step", "counters", "config")

TEMPORARY = "{name}.*.tmp"
"""The names of ``save_checkpoint``'s temporary files beside the checkpoint ``name``."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, refused, not ours, or not this run's."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only folder, ...): names the file and why."""


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------
def save_checkpoint(path, *, model, optimizer, next_step: int, counters: dict, config,
                    scaler=None, fingerprint: dict | None = None) -> None:
    """Write a resumable checkpoint of ``model`` (trainable weights only) to ``path``, atomically.

    ``config`` is a dict of plain types (a dataclass is converted with ``dataclasses.asdict``);
    ``counters`` too. Anything else (a ``Path``, a numpy number) is refused here, at save time,
    because the safe loader would refuse it later.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (or a dataclass), got {type(config).__name__}")
    _check_plain(config, "config")
    _check_plain(counters, "counters")
    if not (isinstance(next_step, int) and not isinstance(next_step, bool) and next_step >= 0):
        raise ValueError(f"next_step must be an integer >= 0, got {next_step!r}")
    state = {
        "format": FORMAT,
        "model": {name: p.detach() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "next_step": next_step,
        "counters": dict(counters),
        "config": dict(config),
    }
    if fingerprint is not None:
        _check_plain(fingerprint, "fingerprint")
        state["fingerprint"] = dict(fingerprint)
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())            # on disk before it replaces the previous checkpoint
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and
                                          ("inline_container" in str(error) or "Writer" in str(error))):
            # torch's zip writer turns a failed write (ENOSPC, EFBIG) into a RuntimeError without the reason
            reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
            raise CheckpointWriteError(f"{path}: the checkpoint could not be written ({reason}; "
                                       f"{_free_space(path.parent)}); the previous checkpoint, if any, is "
                                       f"kept") from None
        raise


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _free_space(folder: Path) -> str:
    import shutil
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def remove_stray_temporaries(path) -> list[Path]:
    """Remove the temporary files of saves of ``path`` that were killed (SIGKILL, power loss) before
    they finished; return what was removed (the caller says so)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stray = sorted(path.parent.glob(TEMPORARY.format(name=path.name)))
    for file in stray:
        file.unlink(missing_ok=True)
    return stray


def _check_plain(value, where: str) -> None:
    """None, bool, int, float, str, and lists, tuples and str-keyed dicts of these."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; use str keys")
            _check_plain(item, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where} is a {type(value).__name__} ({value!r}); a checkpoint stores plain "
                        f"types only (None, bool, int, float, str, list, tuple, dict): convert it, "
                        f"e.g. str(path)")


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------
def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``, without running any code from the file.

    ``map_location`` is passed to ``torch.load`` (default the CPU: ``restore`` copies the tensors
    into the model wherever it is). Raises ``CheckpointError`` (naming the file) if the file is
    missing, not a torch file, truncated or corrupt, refused by the safe loader, or not a sail_min
    checkpoint; a well-formed file that fails to load for another reason is named as intact.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path (a run writes "
                              f"output_dir/checkpoint.pt), or start without resuming")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _is_well_formed_pickle(path):
            raise CheckpointError(
                f"{path}: refused: it holds more than tensors and plain containers "
                f"({_refusal_reason(error)}), and loading it would run code from the file. "
                f"It was not written by sail_min.checkpoint; do not resume from it, or load it "
                f"yourself with weights_only=False only if you trust where it came from") from None
        raise _corrupt(path, error) from None
    except OSError as error:            # permission, I/O error: the file may be fine (torch also raises
        if _readable(path):             # OSError for some truncated files: those it reads are damaged)
            raise _corrupt(path, error) from None
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or _first_line(error)}); the file "
                              f"itself may be intact: fix access to it and resume again") from None
    except Exception as error:          # zip reader, EOF, bad magic number, a device it cannot map to, ...
        if _is_well_formed_pickle(path):
            raise CheckpointError(f"{path}: an intact torch file that failed to load here "
                                  f"({type(error).__name__}: {_first_line(error)}); do not delete it: this "
                                  f"is a problem of the loading side (map_location={map_location!r}), "
                                  f"not of the file") from None
        raise _corrupt(path, error) from None

    if not (isinstance(state, dict) and "format" in state):
        raise CheckpointError(f"{path}: not a sail_min checkpoint (a torch file without the "
                              f"'format' key, holding {_describe(state)}); point to the "
                              f"checkpoint.pt of a sail_min run, or start without resuming")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}, this version reads "
                              f"{FORMAT!r}; resume it with the sail_min version that wrote it, or start anew")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: a sail_min checkpoint without {missing}: the file is damaged; "
                              f"start without resuming or restore it from a copy")
    return state


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    if "WeightsUnpickler error:" in str(error):
        reason = _refusal_reason(error)
    else:
        text = str(error).strip()
        reason = text.splitlines()[0].split(". ")[0][:200] if text else "unexpected end of file"
    return CheckpointError(f"{path}: not a readable torch file (truncated or corrupt: {type(error).__name__}: "
                           f"{reason}); replace it with an intact copy, or start without resuming "
                           f"(checkpoints are written atomically: a run killed while saving leaves none such)")


def _is_well_formed_pickle(path: Path) -> bool:
    """Does the file hold a complete pickle (as a torch zip file's data.pkl, or as the file
    itself)? Only parses the opcodes (``pickletools.genops``), never executes them."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not names:
                    return False
                data = archive.read(names[0])
        else:
            data = path.read_bytes()
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except Exception:
        return False


def _refusal_reason(error: Exception) -> str:
    """The weights-only unpickler's own reason, e.g. 'Unsupported global: GLOBAL io.open'."""
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\n\n|$)", str(error), re.S)
    reason = " ".join(match.group(1).split()) if match else ""
    return reason or "something the safe loader does not build"


def _describe(state) -> str:
    if isinstance(state, dict):
        keys = sorted(map(str, state))
        return f"a dict with keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
    return f"a {type(state).__name__}"


# --------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------
def restore(state: dict, model, optimizer, scaler=None, *, config,
            resumable_changes=RESUMABLE_CHANGES, path=None, fingerprint: dict | None = None) -> tuple[int, dict]:
    """Check that ``state`` belongs to this run, then load it into model, optimizer and scaler.

    Refused (``CheckpointError``), before anything is loaded: settings that differ from
    ``config`` other than ``resumable_changes`` (the fields are named); a ``fingerprint`` (of the
    training data, of the starting weights) other than the saved one; saved weights that
    are not trainable weights of ``model``, or of another shape; trainable weights of
    ``model`` that the checkpoint lacks. ``path`` only names the file in the messages.
    Returns ``(next_step, counters)``.
    """
    where = str(path) if path is not None else "the checkpoint"
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    saved_config = state["config"]
    changed = sorted(k for k in set(saved_config) | set(config) if k not in resumable_changes
                     and (k not in saved_config or k not in config or saved_config[k] != config[k]))
    if changed:
        details = ", ".join(f"{k}: {saved_config.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}"
                            for k in changed)
        raise CheckpointError(f"{where} was written with other settings: {changed} ({details}); "
                              f"use another output_dir, or the same settings to resume")
    saved_fingerprint = state.get("fingerprint") or {}
    for what, value in (fingerprint or {}).items():
        if what in saved_fingerprint and saved_fingerprint[what] != value:
            raise CheckpointError(f"{where} was written for other {FINGERPRINTED[what]} (fingerprint "
                                  f"{saved_fingerprint[what][:12]}, now {value[:12]}); resume with the "
                                  f"{FINGERPRINTED[what]} the run was started with, or start a new run in "
                                  f"another output_dir")

    saved = state["model"]
    current = dict(model.named_parameters())
    trainable = {name for name, p in current.items() if p.requires_grad}
    unexpected = sorted(set(saved) - trainable)
    missing = sorted(trainable - set(saved))
    reshaped = sorted(name for name in set(saved) & trainable if saved[name].shape != current[name].shape)
    if unexpected or missing or reshaped:
        problems = [f"{what} {names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)})"
                    for what, names in (("unexpected weights", unexpected), ("missing weights", missing),
                                        ("weights of other shapes", reshaped)) if names]
        raise CheckpointError(f"{where} does not fit this model: {', '.join(problems)}; resume with the "
                              f"model (and LoRA settings) the run was started with")

    try:                                            # checks its parameter groups before loading
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{where}: the optimizer state does not fit this optimizer ({error}); "
                              f"resume with the optimizer settings the run was started with") from None
    with torch.no_grad():
        for name, tensor in saved.items():
            current[name].copy_(tensor)
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return state["next_step"], dict(state["counters"])
