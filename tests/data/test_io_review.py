"""Review of the data readers and row formats: each parsed row against an independent reading
(``json``, ``csv``, ``pyarrow``) or TRL 1.16's own data utils, and the misreads that must be
one-line errors naming the file and row."""

import csv
import json
import random

import pytest

from dpokit.data import RawRow, load_rows, parse_example, parse_examples
from dpokit.errors import DpokitError

ROWS = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(10)]
USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


def error(function, *args, **kwargs) -> str:
    with pytest.raises(DpokitError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def row(fields, number=4):
    return RawRow("prefs.jsonl", number, fields)


# --- shards: Hub split names ---------------------------------------------------------------

def _hub_layout(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized's layout: data/{split}-00000-of-00001.parquet with
    splits train_prefs, train_sft, train_gen and their test_ twins."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "ultrafeedback" / "data"
    data.mkdir(parents=True)
    for split in ("train_prefs", "train_sft", "train_gen", "test_prefs", "test_sft", "test_gen"):
        pq.write_table(pa.table({"prompt": [split, split + "!"], "chosen": [" a", " b"],
                                 "rejected": [" c", " d"]}),
                       data / f"{split}-00000-of-00001.parquet")
    return data.parent


def test_hub_shard_names_name_the_whole_split(tmp_path):
    """Fails on the old code: split="train" (TRL's default) read train_gen, train_prefs and
    train_sft together (6 rows of three datasets); datasets says Unknown split "train"."""
    import pyarrow.parquet as pq

    repo = _hub_layout(tmp_path)
    splits = "test_gen, test_prefs, test_sft, train_gen, train_prefs, train_sft"
    assert error(load_rows, repo) == (f"{repo}: shards of several splits ({splits}); set split "
                                      f"to choose one")
    assert error(load_rows, repo, split="train") == (
        f"{repo}: no data files for split 'train' (the shards' splits: {splits}); set split to "
        f"one of them")
    shard = repo / "data" / "train_prefs-00000-of-00001.parquet"
    rows = load_rows(repo, split="train_prefs")
    assert [r.fields for r in rows] == pq.read_table(shard).to_pylist()  # the oracle: pyarrow
    assert [(r.source, r.row) for r in rows] == [(str(shard), 1), (str(shard), 2)]


def test_split_shards_of_several_files_are_still_read_in_order(tmp_path):
    """Passes on old and new code: train-0000k-of-00002 shards are split "train"."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k, part in enumerate((ROWS[:3], ROWS[3:5])):
        (folder / f"train-0000{k}-of-00002.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    (folder / "test-00000-of-00001.jsonl").write_text(json.dumps(ROWS[9]) + "\n",
                                                      encoding="utf-8")
    assert [r.fields for r in load_rows(folder, split="train")] == ROWS[:5]
    assert [r.fields for r in load_rows(folder, split="test")] == ROWS[9:]


# --- row numbers against an independent reading ----------------------------------------------

def test_row_numbers_hold_across_files_blank_lines_and_row_groups(tmp_path):
    """Passes on old and new code (a guard): JSON Lines rows are numbered by line in each file
    (blank lines skipped, the second file from 1); Parquet rows run on across row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "lines"
    folder.mkdir()
    text_a = "\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n"
    text_b = "\n\n" + json.dumps(ROWS[2]) + "\n  \n" + json.dumps(ROWS[3])  # no final newline
    (folder / "a.jsonl").write_text(text_a, encoding="utf-8")
    (folder / "b.jsonl").write_text(text_b, encoding="utf-8")
    expected = [(str(folder / name), number, json.loads(line))
                for name, text in (("a.jsonl", text_a), ("b.jsonl", text_b))
                for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    assert [(r.source, r.row, r.fields) for r in load_rows(folder)] == expected
    assert [r.row for r in load_rows(folder)] == [1, 2, 3, 5]

    table = pa.table({k: [r[k] for r in ROWS] for k in ROWS[0]})
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    rows = load_rows(path)
    assert [r.fields for r in rows] == table.to_pylist()
    assert [r.row for r in rows] == list(range(1, 11))


def test_arrow_ipc_file_format_is_read_as_datasets_reads_it(tmp_path):
    """Fails on the old code: an .arrow file in the IPC file format (Feather 2, what
    pyarrow.feather writes) was refused ("cannot read … as an Arrow stream"); datasets reads
    both IPC formats."""
    import pyarrow as pa

    table = pa.table({k: [r[k] for r in ROWS] for k in ROWS[0]})
    path = tmp_path / "prefs.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    rows = load_rows(path)
    assert [r.fields for r in rows] == table.to_pylist()
    assert [r.row for r in rows] == list(range(1, 11))


def test_json_file_of_json_lines_is_read_as_json_lines(tmp_path):
    """Fails on the old code ("line 2: not valid JSON (Extra data)"): a .json file holding one
    object per line, which datasets reads as JSON Lines; rows numbered by line."""
    path = tmp_path / "prefs.json"
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n"
    path.write_text(text, encoding="utf-8")
    assert [(r.row, r.fields) for r in load_rows(path)] == [(1, ROWS[0]), (3, ROWS[1])]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": ', encoding="utf-8")
    assert error(load_rows, broken).startswith(f"{broken}, row 2: not valid JSON")


# --- CSV ------------------------------------------------------------------------------------

def test_csv_rows_short_of_cells_are_refused(tmp_path):
    """Fails on the old code: a row with fewer cells than the header (a cut-off last line, or a
    file whose weight column nobody filled) read the missing cells as null — here every weight
    silently 1, and a cut-off row reported as "'rejected': missing (columns present: …
    rejected)"."""
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected,weight\nq,a,b\nq2,a2,b2\n", encoding="utf-8")
    assert error(load_rows, path) == (f"{path}, row 1 (line 2): 3 cells, the header has 4 "
                                      f"(every row needs a cell for each column, empty or not)")
    cut = tmp_path / "cut.csv"
    cut.write_text("prompt,chosen,rejected\nq,a,b\n\nq2,a2", encoding="utf-8")
    assert error(load_rows, cut).startswith(f"{cut}, row 2 (line 4): 2 cells, the header has 3")


def test_csv_rows_equal_the_csv_module_reading(tmp_path):
    """Passes on old and new code (a guard): quoted commas, newlines and quotes in cells, empty
    cells and a BOM read as the csv module reads them."""
    records = [["prompt", "chosen", "rejected", "weight"],
               ['say "hi", twice', " a,\nb", " c", "0.5"],
               ["", " d", " e ", "2"]]
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as handle:
        csv.writer(handle).writerows(records)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        expected = list(csv.DictReader(handle))
    rows = load_rows(path)
    assert [r.fields for r in rows] == expected
    assert [e.weight for e in parse_examples(rows)] == [0.5, 2.0]


# --- saved datasets ---------------------------------------------------------------------------

@pytest.mark.parametrize("format_type", ["numpy", "torch"])
def test_saved_dataset_with_a_format_reads_python_values(tmp_path, format_type):
    """Fails on the old code: a dataset saved with a numpy/torch format gave np.True_ /
    tensor(True) for a boolean weight, read as weight 1.0 (a Python bool is refused), and
    arrays for lists."""
    import datasets

    records = [{**ROWS[0], "weight": True, "tags": [1.0, 2.0]},
               {**ROWS[1], "weight": False, "tags": [3.0]}]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).with_format(format_type).save_to_disk(str(saved))
    rows = load_rows(saved)
    assert [r.fields for r in rows] == records
    assert all(type(r.fields["weight"]) is bool for r in rows)
    assert error(parse_examples, rows) == (f"{saved}, row 1, field 'weight': expected a number, "
                                           f"got True")


# --- formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_an_unhashable_role_is_a_row_error(role):
    """Fails on the old code: TypeError: unhashable type (a traceback)."""
    fields = {"prompt": [{"role": role, "content": "x"}], "chosen": BLUE, "rejected": GREEN}
    assert error(parse_example, row(fields)).startswith(
        f"prefs.jsonl, row 4, field 'prompt': message 0 has unknown role {role!r}")


@pytest.mark.parametrize("tools", ["[]", []])
def test_no_tools_is_none_as_trl_passes_it(tools):
    """Fails on the old code: tools=[] reached the chat template, where a Llama template renders
    its tool preamble; TRL 1.16's apply_chat_template passes ``tools or None``."""
    example = parse_example(row({"prompt": [USER], "chosen": BLUE, "rejected": GREEN,
                                 "tools": tools}))
    assert example.template_kwargs is None
    tool = [{"type": "function", "function": {"name": "search"}}]
    example = parse_example(row({"prompt": [USER], "chosen": BLUE, "rejected": GREEN,
                                 "tools": json.dumps(tool)}))
    assert example.template_kwargs == {"tools": tool}


@pytest.mark.parametrize(("tools", "message"), [
    ("[" + "9" * 5000 + "]", "JSON that cannot be read"),   # old: ValueError traceback
    ("[" * 100_000, "JSON that cannot be read"),          # old: RecursionError traceback
    ('{"name": "search"}', "expected a list of tool schemas, got dict"),  # old: accepted
    (5, "expected a list of tool schemas, got int"),                      # old: accepted
])
def test_unusable_tools_are_row_errors(tools, message):
    fields = {"prompt": [USER], "chosen": BLUE, "rejected": GREEN, "tools": tools}
    assert error(parse_example, row(fields)).startswith(
        f"prefs.jsonl, row 4, field 'tools': {message}")


def test_an_implicit_prompt_ending_with_a_system_message_is_refused():
    """Fails on the old code: chosen/rejected sharing only a system message gave the prompt
    [system] and completions holding the user's turn (trained on as the model's own words).
    An explicit prompt ending with a system message is read: TRL 1.16's DPOTrainer renders
    it with the generation prompt (its tokenize_fn; only data_utils' apply_chat_template
    raises), and so does dpokit."""
    system = {"role": "system", "content": "Be brief."}
    implicit = {"chosen": [system, USER, BLUE],
                "rejected": [system, {"role": "user", "content": "Other?"}, GREEN]}
    assert error(parse_example, row(implicit)).startswith(
        "prefs.jsonl, row 4, field 'prompt': missing, and chosen/rejected share only messages "
        "up to a 'system' one")
    explicit = {"prompt": [USER, system], "chosen": BLUE, "rejected": GREEN}
    assert parse_example(row(explicit)).prompt == [USER, system]
    # what TRL accepts still reads: a user turn, a tool result, an assistant prefix to continue
    for last in (USER, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It"}):
        example = parse_example(row({"prompt": [system, last], "chosen": BLUE,
                                     "rejected": GREEN}))
        assert example.prompt == [system, last]


@pytest.mark.parametrize("value", ["1_0", "\uff11", "\u0661.5"])
def test_number_strings_python_alone_reads_are_refused(value):
    """Fails on the old code: float() read "1_0" as 10.0, a full-width "１" as 1.0 and an
    Arabic-Indic "١.5" as 1.5 — numbers no CSV reader (or datasets) sees there."""
    fields = {**ROWS[0], "weight": value}
    assert error(parse_example, row(fields)) == (
        f"prefs.jsonl, row 4, field 'weight': expected a number, got {value!r}")


def _trl_extract_prompt(example):
    """TRL 1.16 ``trl/data_utils.py::extract_prompt``, verbatim (the oracle)."""
    for idx in range(min(len(example["chosen"]), len(example["rejected"]))):
        if example["chosen"][idx] != example["rejected"][idx]:
            if example["chosen"][idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {"prompt": example["chosen"][:idx], "chosen": example["chosen"][idx:],
            "rejected": example["rejected"][idx:]}


def test_implicit_prompts_match_trls_extract_prompt():
    """Passes on old and new code (a guard): over 5,000 random text pairs and conversations,
    every accepted implicit-prompt row splits exactly as TRL's extract_prompt does — except
    TRL's index −1 quirk (no shared prefix and chosen ending in a space: TRL moves chosen's
    last character into the prompt) — and every refused one is a row TRL leaves with an empty
    completion or a prompt of no messages."""
    rng = random.Random(0)
    compared = 0
    for _ in range(5000):
        chosen, rejected = ("".join(rng.choice("ab ") for _ in range(rng.randint(1, 6)))
                            for _ in range(2))
        trl = _trl_extract_prompt({"chosen": chosen, "rejected": rejected})
        try:
            example = parse_example(row({"chosen": chosen, "rejected": rejected}))
        except DpokitError:
            assert (not trl["chosen"].strip() or not trl["rejected"].strip()
                    or chosen.startswith(rejected) or rejected.startswith(chosen))
            continue
        if chosen[0] != rejected[0] and chosen.endswith(" "):  # TRL's idx = -1
            assert example.prompt == ""
            continue
        assert (example.prompt, example.chosen, example.rejected) == (
            trl["prompt"], trl["chosen"], trl["rejected"])
        compared += 1
    assert compared > 1000
    other = {"role": "user", "content": "Other?"}
    for chosen, rejected in (([USER, BLUE], [USER, GREEN]),
                             ([USER, BLUE, other, GREEN], [USER, BLUE, other, BLUE])):
        trl = _trl_extract_prompt({"chosen": chosen, "rejected": rejected})
        example = parse_example(row({"chosen": chosen, "rejected": rejected}))
        assert (example.prompt, example.chosen, example.rejected) == (
            trl["prompt"], trl["chosen"], trl["rejected"])
