"""Load and validate preference data D = {(x, y_w, y_l)} and prompt-only data {x}.

Formats (TRL's standard ones), one row per example:

    plain text       {"prompt": "Tell me...", "chosen": "Sure, ...", "rejected": "No."}
    conversational   {"prompt":   [{"role": "user", "content": "Tell me..."}],
                      "chosen":   [{"role": "assistant", "content": "Sure, ..."}],
                      "rejected": [{"role": "assistant", "content": "No."}]}
    implicit prompt  {"chosen":   [{"role": "user", ...}, {"role": "assistant", ...}],
                      "rejected": [{"role": "user", ...}, {"role": "assistant", ...}]}
                     (conversational only: the prompt x is the longest shared run of leading
                     messages, chosen/rejected are what follows it)
    prompt-only      {"prompt": ...} for the online variants, which sample their own responses

Sources: a local .json (an array of objects), .jsonl or .parquet file, or a dataset name on
the Hugging Face hub (needs the network, e.g. on Colab; offline it fails with a DataError).
Local JSON is parsed here, line by line, so that every problem can be named precisely.

Every row is checked before any tensor or Arrow table is built: bad data raises
`DataError` (a ValueError) naming the source, the row (0-based, as in `dataset[row]`; for
.jsonl also the line) and the field, e.g.

    DataError: data/x.jsonl row 2 (line 3), field 'chosen': empty text

The rules, the same for every format and for both loaders:

    text       a non-empty string that is valid Unicode (no lone surrogates such as "\ud800")
    prompt     text, or messages ending with a 'user' message; 'system' only as message 0
    response   text, or exactly ONE 'assistant' message (the policy writes one turn)
    pair       chosen != rejected (identical responses carry no preference)
    file       UTF-8 (a byte-order mark is allowed), at least one row; JSON objects without
               duplicate keys; a .jsonl row ends at "\n" only (U+2028 etc. may stay inside
               strings); a local file is one split, "train"

The result is a `datasets.Dataset` with exactly the columns prompt, chosen, rejected (or
prompt), all rows in one format: plain strings, or message lists of {"role", "content"}.
"""
from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
PROMPT_ROLES = ("system", "user", "assistant")   # a prompt is a conversation that ends with the user
RESPONSE_ROLES = ("assistant",)


class DataError(ValueError):
    """Bad data, with the source, row and field it was found in."""


# Reading rows -----------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _object_without_duplicate_keys(pairs):
    """json object_pairs_hook: {"chosen": "a", "chosen": "b"} is an error, not a silent "b"."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKey(key)
        row[key] = value
    return row


class _HugeNumber:
    """An integer too long for int() (Python refuses over 4300 digits): kept as a placeholder so
    that the field check can name the field; in an unused field it is dropped like any extra."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self):
        return f"<a number of {len(self.digits.lstrip('-'))} digits>"


def _parse_int(digits: str):
    return int(digits) if len(digits) <= 4000 else _HugeNumber(digits)


def _parse_json(text: str):
    """json.loads with the errors a hostile file can cause turned into one short reason.

    Raises json.JSONDecodeError (with its position) or ValueError(reason): a duplicate key,
    nesting deeper than the recursion limit."""
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicate_keys, parse_int=_parse_int)
    except json.JSONDecodeError:
        raise
    except _DuplicateKey as err:
        raise ValueError(f"duplicate key {err.args[0]!r} in one JSON object") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _read_jsonl(path: Path, text: str):
    rows = []
    # split on "\n" only: str.splitlines() also splits at U+2028, U+0085, ..., which JSON
    # writers (ensure_ascii=False) leave unescaped inside strings
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} row {len(rows)} (line {line_number})"
        try:
            row = _parse_json(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON: {err.msg} at column {err.colno}") from None
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _read_json(path: Path, text: str):
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
                        " (for one object per line, name the file .jsonl)") from None
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}"
                        + (" (for one object per line, name the file .jsonl)" if isinstance(data, dict) else ""))
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path} row {i}", row))
    return rows


def _read_parquet(path: Path):
    import pyarrow.parquet as pq   # a dependency of datasets; read directly: no cache, no progress bars
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's own errors are many and deep: name the file
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text; a leading byte-order mark (Windows editors write one) is dropped."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: not UTF-8 text: the file starts with a UTF-16 byte-order mark "
                        f"(re-save it as UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text: invalid byte 0x{raw[err.start]:02x} at byte "
                        f"{err.start} (line {line}); re-save the file as UTF-8") from None


def _read_table(dataset, name: str):
    return [(f"{name} row {i}", row) for i, row in enumerate(dataset)]


def _read_rows(source: str | Path, split: str) -> list[tuple[str, dict]]:
    """[(where, row)] from a local file or a hub dataset; `where` names the row in messages."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_SUFFIXES or path.exists():
        if split != "train":        # load_dataset("json", data_files=...) also calls its one split "train"
            raise DataError(f"{path}: a local file has no splits, got split={split!r}; pass the file "
                            f"that holds that split instead")
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a file ending in one of {LOCAL_SUFFIXES}")
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if not path.is_file():
            raise DataError(f"{path}: not a regular file")
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}, expected one of {LOCAL_SUFFIXES}")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (no rows)")
        if suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise DataError(f"{path}: cannot read the file: {err.strerror or err}") from None
            text = _decode(path, raw)
            rows = _read_jsonl(path, text) if suffix == ".jsonl" else _read_json(path, text)
    else:
        rows = _read_table(_load_from_hub(str(source), split), f"{source}[{split}]")
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def _load_from_hub(name: str, split: str):
    from datasets import load_dataset
    try:
        return load_dataset(name, split=split)
    except Exception as err:  # network, offline mode, unknown name, unknown split
        raise DataError(f"could not load {name!r} (split {split!r}) from the hub: {type(err).__name__}: "
                        f"{err}. Offline (HF_DATASETS_OFFLINE=1)? Use a local .json, .jsonl or "
                        ".parquet file instead.") from None


# Checking fields --------------------------------------------------------------------------

def _check_text(value, where: str, field: str) -> str:
    if value is None:
        raise DataError(f"{where}, field {field!r}: is null, expected text")
    if isinstance(value, _HugeNumber):
        raise DataError(f"{where}, field {field!r}: number too large ({value!r}), expected text")
    if not isinstance(value, str):
        raise DataError(f"{where}, field {field!r}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}, field {field!r}: empty text")
    try:
        value.encode("utf-8")      # Arrow stores UTF-8: a lone surrogate from "\ud800" would fail there
    except UnicodeEncodeError as err:
        raise DataError(f"{where}, field {field!r}: text is not valid Unicode (lone surrogate "
                        f"U+{ord(value[err.start]):04X} at character {err.start})") from None
    return value


def _check_messages(value, where: str, field: str, roles: tuple[str, ...]) -> list[dict]:
    """A non-empty list of {"role", "content"} with roles from `roles` and non-empty content."""
    if value is None:
        raise DataError(f"{where}, field {field!r}: is null, expected a list of messages")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, field {field!r}: expected a non-empty list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__}"
                        + (" of length 0" if isinstance(value, list) else ""))
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}, field {field!r}, message {j}: expected a dict with keys "
                            f"'role' and 'content', got {message!r:.80}")
        if message["role"] not in roles:
            raise DataError(f"{where}, field {field!r}, message {j}: role {message['role']!r:.40} "
                            f"not allowed here (expected one of {roles})")
        content = _check_text(message["content"], f"{where}, field {field!r}, message {j}", "content")
        messages.append({"role": message["role"], "content": content})
    return messages


def _check_prompt_messages(messages: list[dict], where: str, field: str, offset: int = 0) -> None:
    """A prompt conversation: 'system' only first, and the last message is the user's.

    `offset` is the index of messages[0] in `field` (an implicit prompt is a slice)."""
    for j, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise DataError(f"{where}, field {field!r}, message {offset + j}: a 'system' message is "
                            f"allowed only as the first message of the prompt")
    if messages[-1]["role"] != "user":
        only_system = len(messages) == 1 and messages[0]["role"] == "system"
        raise DataError(f"{where}, field {field!r}: the last message must have role 'user', "
                        f"got {messages[-1]['role']!r}"
                        + (" (a system message alone is not a prompt)" if only_system else ""))


def _check_prompt(value, where: str, field: str = "prompt"):
    """Plain text, or a conversation ending with a user message (the policy answers it)."""
    if isinstance(value, str):
        return _check_text(value, where, field)
    messages = _check_messages(value, where, field, PROMPT_ROLES)
    _check_prompt_messages(messages, where, field)
    return messages


def _check_one_assistant_message(messages: list[dict], where: str, field: str, offset: int = 0) -> None:
    """A response is exactly one assistant message: the one turn the policy writes."""
    for j, message in enumerate(messages):
        if message["role"] not in RESPONSE_ROLES:
            raise DataError(f"{where}, field {field!r}, message {offset + j}: role {message['role']!r} "
                            f"not allowed here (expected one of {RESPONSE_ROLES})")
    if len(messages) != 1:
        span = "" if offset == 0 else f" (messages {offset}..{offset + len(messages) - 1}, after the shared prompt)"
        raise DataError(f"{where}, field {field!r}: a response must be exactly one assistant message, "
                        f"got {len(messages)}{span}")


def _check_response(value, where: str, field: str, conversational: bool):
    if not conversational:
        if isinstance(value, list):
            raise DataError(f"{where}, field {field!r}: a message list, but 'prompt' is plain text")
        return _check_text(value, where, field)
    if isinstance(value, str):
        raise DataError(f"{where}, field {field!r}: plain text, but 'prompt' is a message list")
    messages = _check_messages(value, where, field, RESPONSE_ROLES)
    _check_one_assistant_message(messages, where, field)
    return messages


def _require_fields(row: dict, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
        if row[name] is None:
            raise DataError(f"{where}, field {name!r}: is null")


def _split_implicit_prompt(row: dict, where: str) -> dict:
    """Implicit prompt: x = the shared leading messages of chosen and rejected.

    chosen = x + [y_w], rejected = x + [y_l]: x must end with the user's message and each side
    must continue it with exactly one assistant message."""
    _require_fields(row, where, ("chosen", "rejected"))
    if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
        raise DataError(f"{where}: missing field 'prompt' (only conversational data may leave the "
                        f"prompt implicit in 'chosen' and 'rejected')")
    chosen = _check_messages(row["chosen"], where, "chosen", PROMPT_ROLES)
    rejected = _check_messages(row["rejected"], where, "rejected", PROMPT_ROLES)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}: no 'prompt' field and 'chosen' and 'rejected' share no leading "
                        f"messages to take the prompt from")
    if shared == min(len(chosen), len(rejected)):
        raise DataError(f"{where}, fields 'chosen' and 'rejected': "
                        + ("identical conversations" if len(chosen) == len(rejected) else
                           "one conversation is a prefix of the other")
                        + ", so one of them has no response after the prompt")
    prompt = chosen[:shared]
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}, fields 'chosen' and 'rejected': they first differ at message {shared}, "
                        f"so the implicit prompt (their shared messages 0..{shared - 1}) ends with role "
                        f"{prompt[-1]['role']!r}; it must end with a 'user' message, followed by one "
                        f"assistant message on each side")
    _check_prompt_messages(prompt, where, "chosen")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        _check_one_assistant_message(messages[shared:], where, field, offset=shared)
    return {"prompt": prompt, "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _preference_row(row: dict, where: str) -> dict:
    if "prompt" not in row:
        row = _split_implicit_prompt(row, where)
    _require_fields(row, where, ("prompt", "chosen", "rejected"))
    prompt = _check_prompt(row["prompt"], where)
    conversational = isinstance(prompt, list)
    chosen = _check_response(row["chosen"], where, "chosen", conversational)
    rejected = _check_response(row["rejected"], where, "rejected", conversational)
    if chosen == rejected:
        raise DataError(f"{where}, fields 'chosen' and 'rejected': identical responses, so the pair "
                        f"carries no preference")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt_row(row: dict, where: str) -> dict:
    """The prompt under the same rules as in `_preference_row`."""
    if "prompt" not in row and "chosen" in row:
        return {"prompt": _split_implicit_prompt(row, where)["prompt"]}
    _require_fields(row, where, ("prompt",))
    return {"prompt": _check_prompt(row["prompt"], where)}


def _to_dataset(checked: list[tuple[str, dict]]) -> Dataset:
    """All rows in one format (Arrow needs one type per column), then a Dataset."""
    first_where, first = checked[0]
    first_is_text = isinstance(first["prompt"], str)
    for where, row in checked:
        if isinstance(row["prompt"], str) != first_is_text:
            kinds = ("plain text", "conversational") if first_is_text else ("conversational", "plain text")
            raise DataError(f"{where}, field 'prompt': {kinds[1]}, but {first_where} is {kinds[0]}; "
                            f"use one format for the whole dataset")
    return Dataset.from_list([row for _, row in checked])


# Public -----------------------------------------------------------------------------------

def load_preference_data(source: str | Path, split: str = "train") -> Dataset:
    """Preference pairs (prompt, chosen, rejected) from a local file or a hub dataset, validated.

    `split` names a hub dataset's split; a local file is one split, "train"."""
    rows = _read_rows(source, split)
    return _to_dataset([(where, _preference_row(row, where)) for where, row in rows])


def load_prompt_data(source: str | Path, split: str = "train") -> Dataset:
    """Prompts only (column 'prompt'), for online variants; preference data works too."""
    rows = _read_rows(source, split)
    return _to_dataset([(where, _prompt_row(row, where)) for where, row in rows])
