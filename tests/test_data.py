"""load_preference_data / load_prompt_data: the formats, and bad data named by row and field."""
import json
import time
from pathlib import Path

import pytest
from datasets import Dataset

from sail_min.data import DataError, load_preference_data, load_prompt_data

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


PLAIN = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
         {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green.", "extra": 1}]
CONVERSATIONAL = [{"prompt": user("Hi?"), "chosen": assistant("Hello!"), "rejected": assistant("Go away.")}]


def test_plain_text_jsonl(tmp_path):
    data = load_preference_data(write_jsonl(tmp_path / "p.jsonl", PLAIN))
    assert data.column_names == ["prompt", "chosen", "rejected"]
    assert data[1] == {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}


def test_conversational_json_array(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONVERSATIONAL), encoding="utf-8")
    assert load_preference_data(path)[0] == CONVERSATIONAL[0]


def test_implicit_prompt_is_the_shared_leading_messages(tmp_path):
    system = [{"role": "system", "content": "Be kind."}]
    row = {"chosen": system + user("Hi?") + assistant("Hello!"),
           "rejected": system + user("Hi?") + assistant("Go away.")}
    data = load_preference_data(write_jsonl(tmp_path / "i.jsonl", [row]))
    assert data[0] == {"prompt": system + user("Hi?"), "chosen": assistant("Hello!"),
                       "rejected": assistant("Go away.")}
    assert load_prompt_data(tmp_path / "i.jsonl")[0] == {"prompt": system + user("Hi?")}


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    Dataset.from_list(PLAIN).to_parquet(str(path))
    assert load_preference_data(path)[0] == {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}


def test_prompt_only_and_fixtures():
    prompts = load_prompt_data(TINY / "prompts.jsonl")
    assert prompts.column_names == ["prompt"] and prompts[0]["prompt"][0]["role"] == "user"
    pairs = load_preference_data(TINY / "preferences.jsonl")
    assert len(pairs) > 10 and isinstance(pairs[0]["chosen"], str)
    assert load_prompt_data(TINY / "preferences.jsonl")["prompt"] == pairs["prompt"]


BAD_ROWS = [
    # rows (written as .jsonl, one per line), expected message
    ([PLAIN[0], {"prompt": "Hi?", "rejected": "No."}], "row 1 (line 2): missing field 'chosen'"),
    ([{"prompt": "Hi?", "chosen": "  ", "rejected": "No."}], "row 0 (line 1), field 'chosen': empty text"),
    ([{"prompt": "Hi?", "chosen": "Yes", "rejected": 3}], "field 'rejected': expected text, got int"),
    ([{"prompt": "Hi?", "chosen": "Yes", "rejected": None}], "missing field 'rejected'"),
    ([{"prompt": [{"role": "bot", "content": "Hi?"}], "chosen": assistant("a"), "rejected": assistant("b")}],
     "field 'prompt', message 0: role 'bot' not allowed"),
    ([{"prompt": user("Hi?") + assistant("Hm"), "chosen": assistant("a"), "rejected": assistant("b")}],
     "field 'prompt': the last message must have role 'user'"),
    ([{"prompt": user("Hi?"), "chosen": user("a"), "rejected": assistant("b")}],
     "field 'chosen', message 0: role 'user' not allowed"),
    ([{"prompt": user("Hi?"), "chosen": assistant(""), "rejected": assistant("b")}],
     "field 'chosen', message 0, field 'content': empty text"),
    ([{"prompt": user("Hi?"), "chosen": [{"text": "a"}], "rejected": assistant("b")}],
     "field 'chosen', message 0: expected a dict with keys 'role' and 'content'"),
    ([{"prompt": user("Hi?"), "chosen": "a", "rejected": assistant("b")}],
     "field 'chosen': plain text, but 'prompt' is a message list"),
    ([{"prompt": "Hi?", "chosen": [], "rejected": "b"}], "field 'chosen': a message list, but 'prompt' is plain text"),
    ([PLAIN[0], CONVERSATIONAL[0]], "row 1 (line 2), field 'prompt': conversational, but"),
    ([{"chosen": "Hello", "rejected": "Bye"}], "row 0 (line 1): missing field 'prompt'"),
    ([{"chosen": user("a") + assistant("b"), "rejected": user("c") + assistant("d")}], "share no leading messages"),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_rows_name_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_preference_data(path)
    assert message in str(error.value) and str(path) in str(error.value)


BAD_FILES = [
    ("empty.jsonl", b"", "empty file"),
    ("blank.jsonl", b"\n  \n", "no rows"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "not valid UTF-8 at byte 15 (line 1)"),
    ("broken.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n', "row 1 (line 2): invalid JSON"),
    ("list.jsonl", b'["a", "b"]\n', "row 0 (line 1): expected a JSON object, got list"),
    ("object.json", b'{"prompt": "a"}', "expected a JSON array of objects, got dict"),
    ("lines.json", b'{"prompt": "a"}\n{"prompt": "b"}\n', "invalid JSON at line 2"),
    ("garbage.parquet", b"not parquet at all", "not a readable parquet file"),
    ("notes.txt", b"hello", "unsupported file type '.txt'"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_bad_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_preference_data(path)
    assert message in str(error.value)


def test_missing_file_and_missing_parquet_column(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_preference_data(tmp_path / "nope.jsonl")
    path = tmp_path / "no_rejected.parquet"
    Dataset.from_list([{"prompt": "a", "chosen": "b"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"row 0: missing field 'rejected'"):
        load_preference_data(path)


def test_prompt_data_errors(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"question": "no"}])
    with pytest.raises(DataError, match=r"row 1 \(line 2\): missing field 'prompt'"):
        load_prompt_data(path)


def test_hub_name_offline_fails_fast_with_a_data_error():
    start = time.perf_counter()
    with pytest.raises(DataError, match="from the hub"):
        load_preference_data("sail-min/no-such-dataset")
    assert time.perf_counter() - start < 20, "offline mode should fail at once, not wait on the network"


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_identical_implicit_conversations_name_both_fields(tmp_path):
    from sail_min.data import DataError, load_preference_data
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"chosen": turn, "rejected": turn}) + "\n")
    with pytest.raises(DataError, match=r"row 0.*fields 'chosen' and 'rejected': identical conversations"):
        load_preference_data(path)
