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


def test_ultrafeedback_binarized_schema_parquet(tmp_path):
    """trl-lib/ultrafeedback_binarized's layout: no 'prompt' column, messages stored as Arrow structs with the
    keys in the order (content, role), float score columns. The prompt is the shared user turn; the scores
    are not part of a pair."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("chosen", pa.list_(message)), ("rejected", pa.list_(message)),
                        ("score_chosen", pa.float64()), ("score_rejected", pa.float64())])
    turn = {"content": "Hi?", "role": "user"}
    rows = [{"chosen": [turn, {"content": "Hello!", "role": "assistant"}],
             "rejected": [turn, {"content": "Go away.", "role": "assistant"}], "score_chosen": 8.5,
             "score_rejected": 3.0},
            {"chosen": [turn, {"content": "Hey.", "role": "assistant"}],              # a prompt seen before
             "rejected": [turn, {"content": "No.", "role": "assistant"}], "score_chosen": 6.0, "score_rejected": 6.0}]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    data = load_preference_data(path)
    assert data.column_names == ["prompt", "chosen", "rejected"]
    assert data[0] == {"prompt": user("Hi?"), "chosen": assistant("Hello!"), "rejected": assistant("Go away.")}
    assert list(data[0]["prompt"][0]) == ["role", "content"]
    assert load_prompt_data(path)["prompt"] == [user("Hi?"), user("Hi?")]


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
    ([{"prompt": "Hi?", "chosen": "Yes", "rejected": None}], "row 0 (line 1), field 'rejected': is null"),
    ([{"prompt": "Hi?", "chosen": None, "rejected": "No"}], "row 0 (line 1), field 'chosen': is null"),
    ([{"prompt": user("Hi?"), "chosen": [{"role": "assistant", "content": None}], "rejected": assistant("b")}],
     "field 'chosen', message 0, field 'content': is null"),
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
    # a pair of identical responses carries no preference, in every format
    ([PLAIN[0], {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}],
     "row 1 (line 2), fields 'chosen' and 'rejected': identical responses"),
    ([{"prompt": user("Hi?"), "chosen": assistant("Same."), "rejected": assistant("Same.")}],
     "row 0 (line 1), fields 'chosen' and 'rejected': identical responses"),
    # a response is one assistant message
    ([{"prompt": user("Hi?"), "chosen": assistant("a") + assistant("b"), "rejected": assistant("c")}],
     "row 0 (line 1), field 'chosen': a response must be exactly one assistant message, got 2"),
    ([{"prompt": user("Hi?"), "chosen": assistant("a"), "rejected": [{"role": "system", "content": "b"}]}],
     "field 'rejected', message 0: role 'system' not allowed"),
    ([{"chosen": user("Hi?") + assistant("a") + assistant("b"), "rejected": user("Hi?") + assistant("c")}],
     "field 'chosen': a response must be exactly one assistant message, got 2 (messages 1..2, after the shared prompt)"),
    ([{"chosen": user("Hi?") + assistant("a") + user("More?") + assistant("b"), "rejected": user("Hi?") + assistant("c")}],
     "field 'chosen', message 2: role 'user' not allowed"),
    # a prompt ends with the user's message; a system message comes first or not at all
    ([{"prompt": [{"role": "system", "content": "Be kind."}], "chosen": assistant("a"), "rejected": assistant("b")}],
     "field 'prompt': the last message must have role 'user', got 'system' (a system message alone is not a prompt)"),
    ([{"prompt": user("Hi?") + [{"role": "system", "content": "Be kind."}] + user("Hey?"),
       "chosen": assistant("a"), "rejected": assistant("b")}],
     "field 'prompt', message 1: a 'system' message is allowed only as the first message"),
    ([{"chosen": user("Hi?") + assistant("Hm") + assistant("a"), "rejected": user("Hi?") + assistant("Hm") + assistant("b")}],
     "fields 'chosen' and 'rejected': they first differ at message 2, so the implicit prompt (their shared "
     "messages 0..1) ends with role 'assistant'"),
    # text Arrow cannot store
    ([{"prompt": "Hi?", "chosen": "a\ud800b", "rejected": "c"}],
     "row 0 (line 1), field 'chosen': text is not valid Unicode (lone surrogate U+D800 at character 1)"),
    ([{"prompt": user("Hi \udfff"), "chosen": assistant("a"), "rejected": assistant("b")}],
     "field 'prompt', message 0, field 'content': text is not valid Unicode (lone surrogate U+DFFF at character 3)"),
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
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "latin1.jsonl: not UTF-8 text: invalid byte 0xe9 at byte 15 (line 1)"),
    ("utf16.jsonl", '{"prompt": "a"}\n'.encode("utf-16"), "utf16.jsonl: not UTF-8 text: the file starts with a UTF-16"),
    ("broken.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n', "row 1 (line 2): invalid JSON"),
    ("list.jsonl", b'["a", "b"]\n', "row 0 (line 1): expected a JSON object, got list"),
    ("object.json", b'{"prompt": "a"}', "expected a JSON array of objects, got dict (for one object per line, name the file .jsonl)"),
    ("lines.json", b'{"prompt": "a"}\n{"prompt": "b"}\n', "invalid JSON at line 2"),
    ("garbage.parquet", b"not parquet at all", "not a readable parquet file"),
    ("notes.txt", b"hello", "unsupported file type '.txt'"),
    ("huge.jsonl", b'{"prompt": "a", "chosen": ' + b"1" * 5000 + b', "rejected": "c"}\n',
     "huge.jsonl row 0 (line 1), field 'chosen': number too large (<a number of 5000 digits>), expected text"),
    ("huge.json", b'[{"prompt": "a", "chosen": "b", "rejected": -' + b"1" * 5000 + b"}]",
     "huge.json row 0, field 'rejected': number too large (<a number of 5000 digits>)"),
    ("deep.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "deep.jsonl row 0 (line 1): JSON nested too deeply"),
    ("twice.jsonl", b'{"prompt": "a", "chosen": "b", "chosen": "c", "rejected": "d"}\n',
     "twice.jsonl row 0 (line 1): duplicate key 'chosen'"),
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


def test_prompt_data_follows_the_preference_data_rules(tmp_path):
    """A prompt refused by load_preference_data is refused by load_prompt_data, with the same message."""
    system = [{"role": "system", "content": "Be kind."}]
    rows = [
        {"prompt": system, "chosen": assistant("a"), "rejected": assistant("b")},           # system only
        {"prompt": user("Hi?") + assistant("Hm"), "chosen": assistant("a"), "rejected": assistant("b")},
        {"chosen": system + user("Hi?") + assistant("a"), "rejected": system + user("Yo?") + assistant("b")},
        {"chosen": user("Hi?") + assistant("Hm") + assistant("a"), "rejected": user("Hi?") + assistant("Hm") + assistant("b")},
    ]
    for i, row in enumerate(rows):
        path = write_jsonl(tmp_path / f"rule{i}.jsonl", [row])
        with pytest.raises(DataError) as as_pairs:
            load_preference_data(path)
        with pytest.raises(DataError) as as_prompts:
            load_prompt_data(path)
        assert str(as_prompts.value) == str(as_pairs.value)
        assert f"rule{i}.jsonl row 0 (line 1)" in str(as_prompts.value)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": system}])
    with pytest.raises(DataError, match=r"row 0 \(line 1\), field 'prompt': the last message must have role 'user'"):
        load_prompt_data(path)


def test_byte_order_mark_is_accepted(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(PLAIN[0]) + "\n").encode())
    assert load_preference_data(jsonl)[0] == PLAIN[0]
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(PLAIN[:1]).encode())
    assert load_preference_data(array)[0] == PLAIN[0]


def test_unicode_line_separators_inside_strings_stay_in_their_row(tmp_path):
    """JSON writers leave U+2028, U+0085, form feed ... raw in strings; only \\n ends a .jsonl row."""
    rows = [{"prompt": "a\u2028b", "chosen": "c\x85d", "rejected": "e\x0cf"}, PLAIN[0]]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    data = load_preference_data(path)
    assert data["prompt"] == ["a\u2028b", "Hi?"] and data[0]["chosen"] == "c\x85d"
    path.write_text(path.read_text(encoding="utf-8") + '{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): missing field 'chosen'"):
        load_preference_data(path)


def test_directory_and_empty_files(tmp_path):
    folder = tmp_path / "pairs.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"pairs.jsonl: is a directory"):
        load_preference_data(folder)
    with pytest.raises(DataError, match=r"is a directory"):
        load_prompt_data(tmp_path)
    empty = tmp_path / "empty.parquet"
    Dataset.from_list(PLAIN).select([]).to_parquet(str(empty))
    with pytest.raises(DataError, match=r"empty.parquet: no rows"):
        load_preference_data(empty)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jsonl: empty file \(no rows\)"):
        load_prompt_data(tmp_path / "empty.jsonl")


def test_parquet_nulls_are_named(tmp_path):
    path = tmp_path / "nulls.parquet"
    Dataset.from_list([PLAIN[0], {"prompt": "Sky?", "chosen": None, "rejected": "Green."}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"nulls.parquet row 1, field 'chosen': is null"):
        load_preference_data(path)


def test_a_huge_number_in_an_unused_field_is_dropped_like_any_extra_field(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "id": ' + "7" * 5000 + "}\n")
    assert load_preference_data(path)[0] == {"prompt": "a", "chosen": "b", "rejected": "c"}


def test_local_files_have_one_split_and_any_suffix_case(tmp_path):
    path = write_jsonl(tmp_path / "PAIRS.JSONL", PLAIN)
    assert len(load_preference_data(path, split="train")) == 2
    with pytest.raises(DataError, match=r"PAIRS.JSONL: a local file has no splits, got split='test'"):
        load_prompt_data(path, split="test")


def test_home_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "pairs.jsonl", PLAIN)
    assert load_preference_data("~/pairs.jsonl")[0] == PLAIN[0]
