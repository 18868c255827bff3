"""Data readers: every format users bring, and errors that name file:line and the field."""

import json

import pytest

from xwin_jax.data import formats
from xwin_jax.data.formats import ASSISTANT, SYSTEM, USER, DataFormatError


def write_lines(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_sharegpt_chat_and_alpaca_records(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."},
                           {"from": "human", "value": "Who are you?"},
                           {"from": "gpt", "value": "I am Xwin-LM."}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ])
    result = formats.read_sft(path)
    assert len(result) == 4 and not result.skipped
    first = result.records[0]
    assert first.system == "Be brief."
    assert [m.role for m in first.turns] == [USER, ASSISTANT, USER, ASSISTANT]
    assert first.source == f"{path}:1"
    assert result.records[2].messages[0] == formats.Message(USER, "Add.\n\n2 and 3")
    assert result.records[3].messages[0].content == "Say hi."


def test_json_array_files_report_line_numbers(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataFormatError, match=rf"{path}:4: field 'output': missing"):
        formats.read_sft(str(path))


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     r":1: field 'conversations\[0\]': expected a user message"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},
     r":1: field 'conversations\[1\]\.from': unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "x"}]},
     r":1: field 'conversations\[0\]': the last message must be from the assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
     r":1: field 'messages\[1\]\.content': expected a string"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]},
     r":1: field 'conversations\[1\]\.value': missing"),
    ({"text": "hello"}, r":1: field '<record>': expected `conversations`"),
    ("{not json", r":1: field '<line>': invalid JSON"),
    ([1, 2], r":1: field '<record>': expected a JSON object"),
])
def test_malformed_sft_records_name_file_line_field(tmp_path, record, message):
    path = write_lines(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataFormatError, match=message):
        formats.read_sft(path)


def test_skip_invalid_counts_and_reports(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        {"instruction": "a", "output": "b"}, "{broken", {"instruction": "c", "output": ""},
        {"instruction": "d", "output": "e"}])
    result = formats.read_sft(path, skip_invalid=True)
    assert [r.messages[1].content for r in result] == ["b", "e"]
    assert len(result.skipped) == 2
    assert result.skipped[0].startswith(f"{path}:2:")
    assert result.skipped[1] == f"{path}:3: field 'output': empty"
    assert "2 records, 2 skipped" in result.report()


def test_pairs_with_text_or_message_prompts(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        {"prompt": "Which is larger, 3 or 5?", "chosen": "5", "rejected": "3",
         "chosen_rating": 9, "rejected_rating": 2},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "chosen": "good", "rejected": "bad"},
    ])
    pairs = formats.read_pairs(path).records
    assert pairs[0].prompt.messages == (formats.Message(USER, "Which is larger, 3 or 5?"),)
    assert (pairs[0].chosen_rating, pairs[0].rejected_rating) == (9.0, 2.0)
    assert pairs[1].prompt.system == "S" and pairs[1].prompt.messages[-1].content == "c"
    assert pairs[1].chosen_rating is None


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a"}, r"field 'rejected': missing"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_rating": "high"},
     r"field 'chosen_rating': expected a number"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "chosen": "x", "rejected": "y"},
     r"field 'prompt\[1\]': the last message must be from the user"),
])
def test_malformed_pairs(tmp_path, record, message):
    path = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "ok", "chosen": "a",
                                                   "rejected": "b"}, record])
    with pytest.raises(DataFormatError, match=rf":2: {message}"):
        formats.read_pairs(path)


def test_prompt_lists_jsonl_and_alpaca_eval(tmp_path):
    jsonl = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "Bye"}])
    assert [p.text for p in formats.read_prompts(jsonl)] == ["Hi", "Bye"]
    alpaca_eval = tmp_path / "eval.json"
    alpaca_eval.write_text(json.dumps([{"instruction": "Name a color.", "dataset": "helpful_base",
                                        "output": "Red.", "generator": "davinci"}], indent=2))
    prompt = formats.read_prompts(str(alpaca_eval)).records[0]
    assert prompt.text == "Name a color." and prompt.record["dataset"] == "helpful_base"
    assert prompt.source == f"{alpaca_eval}:2"
    with pytest.raises(DataFormatError, match=r":1: field 'prompt': missing"):
        formats.read_prompts(write_lines(tmp_path / "bad.jsonl", [{"question": "x"}]))


def test_written_sharegpt_reads_back(tmp_path):
    conversation = formats.Conversation((formats.Message(SYSTEM, "s"), formats.Message(USER, "u"),
                                         formats.Message(ASSISTANT, "a")))
    path = str(tmp_path / "out.jsonl")
    formats.write_jsonl(path, [formats.conversation_to_sharegpt(conversation)])
    assert formats.read_sft(path).records[0].messages == conversation.messages


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", '
                     b'"output": "x"}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:2: field '<line>': not valid UTF-8 "
                                              r"\(byte 21 of the line"):
        formats.read_sft(str(path))
    assert len(formats.read_sft(str(path), skip_invalid=True)) == 1
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "\xe9"}]')
    with pytest.raises(DataFormatError, match=rf"{array}:3: not valid UTF-8"):
        formats.read_sft(str(array))


def test_unicode_line_separators_stay_inside_their_records(tmp_path):
    """U+2028, U+2029 and U+0085 are text inside JSON strings, not line breaks: files the
    project writes read back record for record, and so do files written unescaped by other
    tools."""
    text = "first\u2028second\u2029third\x85fourth"
    records = [{"instruction": text, "output": f"answer {i}"} for i in range(3)]
    ours = tmp_path / "ours.jsonl"
    formats.write_jsonl(str(ours), records)
    assert len(ours.read_text(encoding="utf-8").splitlines()) == 3  # escaped: safe for any reader
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                      encoding="utf-8")
    for path in (ours, theirs):
        read = formats.read_sft(str(path))
        assert [c.messages[0].content for c in read] == [text] * 3
        assert [c.messages[1].content for c in read] == ["answer 0", "answer 1", "answer 2"]


def test_appended_files_drop_what_a_kill_cut_off(tmp_path):
    """Torn JSON, a torn UTF-8 character, a missing final newline: each costs only its own
    record, and the file is left ready for the next append."""
    path = tmp_path / "outputs.jsonl"
    lines = [formats.jsonl_line({"index": i, "output": f"réponse {i}"}).encode() for i in range(3)]
    torn_character = lines[2][:lines[2].index("é".encode()) + 1]  # half of é's two bytes
    for tail in (lines[2][:-1], torn_character, lines[2][:10]):
        path.write_bytes(lines[0] + lines[1] + tail)
        assert sorted(formats.read_appended_jsonl(str(path), "index")) == [0, 1]
        assert path.read_bytes() == lines[0] + lines[1]
    path.write_bytes(lines[0] + b'{"index": 1, "output": "\xff"}\n' + lines[2])
    assert sorted(formats.read_appended_jsonl(str(path), "index")) == [0, 2]
    assert formats.read_appended_jsonl(str(tmp_path / "missing.jsonl"), "index") == {}


def test_appends_resume_on_a_clean_line_and_a_torn_tail_is_cut_in_place(tmp_path):
    """A torn last line is truncated away (the file keeps its inode: nothing rewritten);
    a bad line further up is dropped by an atomic rewrite (no temporary file left)."""
    path = tmp_path / "outputs.jsonl"
    formats.append_jsonl(str(path), [{"index": 0, "output": "a"}, {"index": 1, "output": "b"}])
    formats.append_jsonl(str(path), [{"index": 2, "output": "c\u2028d"}], sync=False)
    assert formats.read_appended_jsonl(str(path), "index") == {
        0: {"index": 0, "output": "a"}, 1: {"index": 1, "output": "b"},
        2: {"index": 2, "output": "c\u2028d"}}
    whole = path.read_bytes()
    inode = path.stat().st_ino
    with open(path, "ab") as f:
        f.write(b'{"index": 3, "out')  # what a kill mid-append leaves
    assert sorted(formats.read_appended_jsonl(str(path), "index")) == [0, 1, 2]
    assert path.read_bytes() == whole and path.stat().st_ino == inode
    formats.append_jsonl(str(path), [{"index": 3, "output": "e"}])
    assert sorted(formats.read_appended_jsonl(str(path), "index")) == [0, 1, 2, 3]
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"\x00\x00\x00", *lines[1:]]))
    assert sorted(formats.read_appended_jsonl(str(path), "index")) == [0, 1, 2, 3]
    assert path.read_bytes() == whole + formats.jsonl_line({"index": 3, "output": "e"}).encode()
    assert [p.name for p in tmp_path.iterdir()] == ["outputs.jsonl"]
