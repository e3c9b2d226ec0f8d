"""Preference data sets in the shapes they come in from the Hub, read as ``dpokit train`` reads
them (:func:`dpokit.data.pipeline.load_preference_pairs`): small look-alikes of Anthropic
HH-RLHF, UltraFeedback (binarized and raw), HelpSteer2, Argilla's DPO mixes and Intel's
orca_dpo_pairs, as JSON Lines, CSV, Parquet, saved ``DatasetDict``s and Hub-named shards.

The token oracle is TRL 1.16's DPOTrainer tokenisation, restated here (``trl_ids``, from
``trl/trainer/dpo_trainer.py::_prepare_dataset`` and ``trl/data_utils.py::extract_prompt``):
prompt, prompt + chosen and prompt + rejected tokenised apart (chat template with the
generation prompt on the prompt side, or plain text with EOS appended to each completion), the
prompt their longest common token prefix; an implicit text prompt is the shared leading
characters less one trailing space. Checked equal, token for token, to what TRL 1.16 itself
built on these rows (run once beside this file's review).
"""

import json
import logging
import re

import pytest

from dpokit.data.formats import ColumnMap
from dpokit.data.pipeline import load_preference_pairs
from dpokit.data.tokenize import TokenizeSettings, common_prefix_length
from dpokit.errors import DpokitError

datasets = pytest.importorskip("datasets")

UNLIMITED = TokenizeSettings(max_length=None)


def hh(*turns: str) -> str:
    """An HH-RLHF conversation: ``\\n\\nHuman: …\\n\\nAssistant: …``."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}"
                   for i, t in enumerate(turns))


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def trl_ids(tokenizer, prompt, chosen, rejected):
    """TRL 1.16's ``tokenize_fn`` (after ``extract_prompt`` and ``add_eos``)."""
    if prompt is None:  # extract_prompt
        idx = next((i for i in range(min(len(chosen), len(rejected)))
                    if chosen[i] != rejected[i]), None)
        if isinstance(chosen, str) and idx and chosen[idx - 1] == " ":
            idx -= 1
        prompt, chosen, rejected = chosen[:idx], chosen[idx:], rejected[idx:]
    if isinstance(chosen, list):
        def enc(messages, gen=False):
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                      add_generation_prompt=gen)["input_ids"])
        p, pc, pr = enc(prompt, True), enc(prompt + chosen), enc(prompt + rejected)
    else:
        eos = tokenizer.eos_token
        p = tokenizer(prompt)["input_ids"]
        pc = tokenizer(prompt + chosen + eos)["input_ids"]
        pr = tokenizer(prompt + rejected + eos)["input_ids"]
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    return p[:n], pc[n:], pr[n:]


def triples(pairs):
    return [(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)) for p in pairs]


def load(path, tokenizer, **kwargs):
    kwargs.setdefault("settings", UNLIMITED)
    return load_preference_pairs(path, tokenizer, progress=False, **kwargs)


# ---------------------------------------------------------------------------- HH-RLHF (text)

HH_ROWS = [
    {"chosen": hh("What colour is the sky?", "It is blue."),
     "rejected": hh("What colour is the sky?", "Green, obviously.")},
    {"chosen": hh("Hi", "Hello! 😀", "Tell me a joke", "Why did the chicken cross?"),
     "rejected": hh("Hi", "Hello! 😀", "Tell me a joke", "No.")},
    {"chosen": hh("Is it 4?", "The answer is 4."), "rejected": hh("Is it 4?", "The answer is 5.")},
    {"chosen": hh("Ünïcödé – ça va?", "Oui, très bien 🇫🇷"),
     "rejected": hh("Ünïcödé – ça va?", "Non 🙃")},
]


def test_hh_rlhf_implicit_prompts_tokenise_as_trl(tmp_path, tokenizer):
    """The prompt is the shared text up to ``Assistant:`` (the space goes to the completions),
    multi-turn and non-ASCII rows included; the tokens are TRL's."""
    pairs = load(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), tokenizer)
    assert triples(pairs) == [trl_ids(tokenizer, None, r["chosen"], r["rejected"])
                              for r in HH_ROWS]
    assert tokenizer.decode(pairs[0].prompt_ids, skip_special_tokens=True).endswith(
        "Assistant:")
    assert tokenizer.decode(pairs[1].chosen_ids) == " Why did the chicken cross?</s>"


def test_hh_rlhf_saved_dataset_dict_reads_the_chosen_split(tmp_path, tokenizer):
    """A ``DatasetDict`` saved in shards: ``split`` picks its rows, numbered across shards."""
    train = [{"chosen": hh(f"Q{i}", f"good {i}"), "rejected": hh(f"Q{i}", f"bad {i}")}
             for i in range(7)]
    test = [{"chosen": hh(f"T{i}", "yes"), "rejected": hh(f"T{i}", "no")} for i in range(3)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                               "test": datasets.Dataset.from_list(test)})
    dd.save_to_disk(str(tmp_path / "hh"), num_shards={"train": 3, "test": 1})
    pairs = load(tmp_path / "hh", tokenizer, split="train")
    assert [p.row for p in pairs] == list(range(1, 8))
    assert triples(pairs) == [trl_ids(tokenizer, None, r["chosen"], r["rejected"])
                              for r in train]
    assert len(load(tmp_path / "hh", tokenizer, split="test")) == 3
    with pytest.raises(DpokitError, match="splits test, train; set split"):
        load(tmp_path / "hh", tokenizer)


# ------------------------------------------------------------------ UltraFeedback, binarized

def ultrafeedback_binarized_rows():
    qs = [("What is 2+2?", "4", "5"), ("Write a haiku 🌸", "Petals fall softly", "no"),
          ("Explain DPO", "It optimises preferences directly.", "A database.")]
    return [{"prompt": q, "prompt_id": str(i),
             "chosen": chat(("user", q), ("assistant", c)),
             "rejected": chat(("user", q), ("assistant", r)),
             "messages": chat(("user", q), ("assistant", c)),
             "score_chosen": 8.0, "score_rejected": 3.0} for i, (q, c, r) in enumerate(qs)]


def test_ultrafeedback_binarized_hub_shards_warn_once_of_the_unread_text_prompt(
        tmp_path, tokenizer, caplog):
    """H4's layout: ``data/{train_prefs,test_prefs,train_sft}-00000-of-00001.parquet``, a text
    ``prompt`` beside whole conversations. The prompt is the shared user turn (TRL's tokens);
    that the text prompt is not read is said once with a count — it was one warning per row
    before (61,135 lines on the real train_prefs)."""
    rows = ultrafeedback_binarized_rows()
    (tmp_path / "data").mkdir()
    for split in ("train_prefs", "test_prefs", "train_sft"):
        datasets.Dataset.from_list(rows).to_parquet(
            str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(DpokitError, match="no data files for split 'train'"):
        load(tmp_path, tokenizer, split="train")
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = load(tmp_path, tokenizer, split="train_prefs")
    assert triples(pairs) == [trl_ids(tokenizer, None, r["chosen"], r["rejected"])
                              for r in rows]
    warned = [r.getMessage() for r in caplog.records if "text prompt" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("3 of 3 rows:"), warned


def test_argilla_mix_keeps_the_system_turn_in_the_prompt(tmp_path, tokenizer):
    """dpo-mix-7k: chosen/rejected as whole conversations with a system turn, ratings beside;
    the system message stays in the prompt, a later divergence stays in the completions."""
    system = ("system", "You are helpful. Réponds en français 🇫🇷")
    rows = [{"dataset": "capybara", "chosen_rating": 5.0, "rejected_rating": 2.0,
             "chosen": chat(system, ("user", "Hi"), ("assistant", "Bonjour !")),
             "rejected": chat(system, ("user", "Hi"), ("assistant", "Hello"))},
            {"dataset": "x", "chosen_rating": 4.0, "rejected_rating": 1.0,
             "chosen": chat(system, ("user", "Go"), ("assistant", "A"), ("user", "ok"),
                            ("assistant", "B")),
             "rejected": chat(system, ("user", "Go"), ("assistant", "C"), ("user", "ok"),
                              ("assistant", "D"))}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mix.parquet"))
    pairs = load(tmp_path / "mix.parquet", tokenizer)
    assert triples(pairs) == [trl_ids(tokenizer, None, r["chosen"], r["rejected"])
                              for r in rows]
    assert tokenizer.decode(pairs[0].prompt_ids).startswith("<|system|>\nYou are helpful.")
    assert tokenizer.decode(pairs[1].chosen_ids) == (
        "A</s>\n<|user|>\nok</s>\n<|assistant|>\nB</s>\n")


def test_message_prompt_repeated_by_whole_conversations_is_split_off(tmp_path, tokenizer,
                                                                     caplog):
    """A prompt of messages beside chosen/rejected that are the whole conversations (exports
    that keep both): the completions were prompt + conversation, training the model to say the
    user's turn again (TRL does the same); now the repeated messages are split off, said once."""
    user = {"role": "user", "content": "Hi"}
    rows = [{"prompt": [user], "chosen": [user, {"role": "assistant", "content": "Hello"}],
             "rejected": [user, {"role": "assistant", "content": "Go"}]}] * 2
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = load(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    expected = trl_ids(tokenizer, [user], [rows[0]["chosen"][1]], [rows[0]["rejected"][1]])
    assert triples(pairs) == [expected, expected]
    assert tokenizer.decode(pairs[0].chosen_ids) == "Hello</s>\n"
    assert "2 of 2 rows: chosen/rejected are whole conversations" in caplog.text


def test_text_prompt_beside_unshared_messages_names_the_text_prompt(tmp_path, tokenizer):
    """A text prompt with assistant-only message completions was refused as "prompt missing"
    (while present); the line now says what is wrong with it."""
    rows = [{"prompt": "Hi", "chosen": {"role": "assistant", "content": "Hello"},
             "rejected": {"role": "assistant", "content": "Go"}}]
    with pytest.raises(DpokitError, match=r"p.jsonl, row 1, field 'prompt': a text prompt "
                                          r"beside conversational chosen/rejected"):
        load(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)


# ------------------------------------------------------------------------ UltraFeedback, raw

def raw_ultrafeedback_rows():
    def completion(response, overall, fine):
        return {"model": "m", "principle": "helpfulness", "custom_system_prompt": "sys",
                "annotations": {"helpfulness": {"Rating": "4", "Rationale": "ok"}},
                "critique": "c", "fine-grained_score": fine, "overall_score": overall,
                "response": response}
    return [{"source": "evol", "instruction": "Name a colour.",
             "completions": [completion(" Blue.", 7.0, 2.0), completion(" Green.", 9.0, 4.5),
                             completion(" Dog.", 2.0, 1.0), completion(" Red.", 5.0, 5.0)]},
            {"source": "evol", "instruction": "Say hi 👋",
             "completions": [completion(" Hi!", 8.0, 3.0), completion(" Bye.", 8.0, 1.0)]}]


def test_raw_ultrafeedback_reads_overall_score_and_drops_ties_with_a_count(tmp_path, tokenizer,
                                                                           caplog):
    """``completions: [{"response", "overall_score", …}]`` with ``prompt_column: instruction``:
    best vs worst by overall_score (Green 9 vs Dog 2), the all-tied prompt dropped and said."""
    path = write_jsonl(tmp_path / "uf.jsonl", raw_ultrafeedback_rows())
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = load(path, tokenizer, columns=ColumnMap(prompt="instruction"))
    assert triples(pairs) == [trl_ids(tokenizer, "Name a colour.", " Green.", " Dog.")]
    assert "1 of 2 prompts have no two completions of different scores" in caplog.text


@pytest.mark.parametrize(("columns", "message"), [
    # the nested key a user means: it was ignored, overall_score picked without a word
    (dict(score="fine-grained_score"),
     r"no column 'fine-grained_score' \(score_column\); score_column is for data of one row "
     r"per completion .* keys score, rating, overall_score"),
    (dict(completion="text"), r"no column 'text' \(completion_column\)"),
    # a renamed per-pair column that is absent: it was weight 1 for every pair
    (dict(weight="wt"), r"no column 'wt' \(weight_column\); columns: completions, instruction"),
    (dict(margin="gap"), r"no column 'gap' \(margin_column\)"),
])
def test_raw_ultrafeedback_refuses_a_renamed_column_it_would_not_read(tmp_path, tokenizer,
                                                                      columns, message):
    """A renamed column naming no column is refused for k-completion data as for pairs (the
    README's rule); before, the list shape skipped the check and trained on the defaults."""
    path = write_jsonl(tmp_path / "uf.jsonl", raw_ultrafeedback_rows())
    with pytest.raises(DpokitError, match=message):
        load(path, tokenizer, columns=ColumnMap(prompt="instruction", **columns))


# ------------------------------------------------------------------------------- HelpSteer2

def helpsteer_rows():
    def row(prompt, response, helpfulness, correctness):
        return {"prompt": prompt, "response": response, "helpfulness": helpfulness,
                "correctness": correctness, "coherence": 4, "complexity": 2, "verbosity": 1}
    return [row("What is 2+2?", " 4", 4, 4), row("What is 2+2?", " 5", 1, 0),
            row("Say hi", " Hi", 3, 4), row("Say hi", " Yo", 3, 1),
            row("Tell a joke <extra_id_1>Assistant", " No", 0, 3),
            row("Tell a joke <extra_id_1>Assistant", " A pun", 2, 3)]


@pytest.mark.parametrize(("score", "expected"), [
    ("helpfulness", [("What is 2+2?", " 4", " 5"), ("Tell a joke <extra_id_1>Assistant",
                                                     " A pun", " No")]),
    ("correctness", [("What is 2+2?", " 4", " 5"), ("Say hi", " Hi", " Yo")]),
])
def test_helpsteer2_rows_group_by_prompt_under_the_chosen_score(tmp_path, tokenizer, score,
                                                                expected):
    """One row per completion with several score columns, from Parquet: the pairs follow the
    score column named; a prompt tied on it gives none."""
    datasets.Dataset.from_list(helpsteer_rows()).to_parquet(str(tmp_path / "hs.parquet"))
    pairs = load(tmp_path / "hs.parquet", tokenizer,
                 columns=ColumnMap(completion="response", score=score))
    assert triples(pairs) == [trl_ids(tokenizer, *t) for t in expected]
    assert len({p.group for p in pairs}) == 2


def test_helpsteer2_misspelt_score_column_is_the_column_named(tmp_path, tokenizer):
    """``score_column: helpfulnes``: the error named the 'chosen' column (the data read as
    pairs for want of the score), not the misspelt name the user wrote."""
    path = write_jsonl(tmp_path / "hs.jsonl", helpsteer_rows())
    with pytest.raises(DpokitError, match=r"no column 'helpfulnes' \(score_column\)"):
        load(path, tokenizer, columns=ColumnMap(completion="response", score="helpfulnes"))


# -------------------------------------------------------------------------- orca_dpo_pairs

ORCA_ROWS = [
    {"system": "You are an AI assistant.", "question": "Translate 'chat'.", "chosen": "Cat.",
     "rejected": "Dog."},
    {"system": "", "question": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"},
    {"system": "Be brief.", "question": 'Emoji 🤖 "quoted", commas,\nnewlines',
     "chosen": "Sure, 👍", "rejected": "No,\n no"},
    {"system": "dup", "question": "Same", "chosen": "Same", "rejected": "Same"},
    {"system": "dup", "question": "Same", "chosen": "Same", "rejected": "Same"},
]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_orca_pairs_with_prompt_column_match_trl_and_count_identical_rows(
        tmp_path, tokenizer, caplog, suffix):
    """``prompt_column: question``; quotes, commas and newlines survive CSV; the duplicated
    rows whose chosen equals rejected are kept (as TRL trains on them) and counted once."""
    import csv

    path = tmp_path / f"orca.{suffix}"
    if suffix == "csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ORCA_ROWS[0]))
            writer.writeheader()
            writer.writerows(ORCA_ROWS)
    else:
        write_jsonl(path, ORCA_ROWS)
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = load(path, tokenizer, columns=ColumnMap(prompt="question"))
    assert triples(pairs) == [trl_ids(tokenizer, r["question"], r["chosen"], r["rejected"])
                              for r in ORCA_ROWS]
    assert "2 of 5 rows have identical chosen and rejected" in caplog.text


def test_orca_pairs_without_prompt_column_say_the_prompt_is_empty(tmp_path, tokenizer, caplog):
    """Without ``prompt_column`` the rows read as implicit prompts sharing nothing: every pair
    trained unconditioned, the question never read — TRL's tokens too, but it was only an info
    line; now a warning with the count and the unread columns."""
    rows = ORCA_ROWS[:3]
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = load(write_jsonl(tmp_path / "orca.jsonl", rows), tokenizer)
    assert triples(pairs) == [trl_ids(tokenizer, None, r["chosen"], r["rejected"]) for r in rows]
    assert all(p.prompt_ids == [tokenizer.bos_token_id] for p in pairs)
    assert "3 of 3 rows: no prompt column, and chosen and rejected share no leading text" in (
        caplog.text)
    assert "columns not read: system, question" in caplog.text


# --------------------------------------------------------------------- CSV of message lists

def test_csv_written_by_pandas_reads_its_message_cells(tmp_path, tokenizer):
    """pandas' ``to_csv`` writes a list of messages as Python text (single quotes): it was read
    as a text completion ``"[{'role': 'user', …}]"`` and trained on; now it is the messages."""
    pd = pytest.importorskip("pandas")
    user = {"role": "user", "content": "Hi, it's me"}
    chosen = [user, {"role": "assistant", "content": "Hello"}]
    rejected = [user, {"role": "assistant", "content": "Go"}]
    pd.DataFrame({"chosen": [chosen], "rejected": [rejected]}).to_csv(
        tmp_path / "pd.csv", index=False)
    assert "[{'role'" in (tmp_path / "pd.csv").read_text()
    pairs = load(tmp_path / "pd.csv", tokenizer)
    assert triples(pairs) == [trl_ids(tokenizer, None, chosen, rejected)]


def test_csv_written_by_datasets_is_refused_not_trained_as_text(tmp_path, tokenizer):
    """``datasets``' ``to_csv`` prints message lists as numpy arrays (no commas), which no
    parser reads back: refused with the file, row and column instead of trained as text."""
    ds = datasets.Dataset.from_list([{"chosen": chat(("user", "Hi"), ("assistant", "Hello")),
                                      "rejected": chat(("user", "Hi"), ("assistant", "Go"))}])
    ds.to_csv(str(tmp_path / "ds.csv"), index=False)
    with pytest.raises(DpokitError, match=r"ds.csv, row 1, field 'chosen': a list of messages "
                                          r"written as Python or numpy text"):
        load(tmp_path / "ds.csv", tokenizer)


def test_csv_text_that_merely_looks_bracketed_stays_text(tmp_path, tokenizer):
    """A completion that happens to start ``[{`` and end ``}]`` but holds no message is text."""
    rows = [{"prompt": "JSON?", "chosen": "[{x: 1}]", "rejected": "no"}]
    (tmp_path / "t.csv").write_text("prompt,chosen,rejected\n" + "\n".join(
        f'{r["prompt"]},"{r["chosen"]}",{r["rejected"]}' for r in rows) + "\n")
    pairs = load(tmp_path / "t.csv", tokenizer)
    assert triples(pairs) == [trl_ids(tokenizer, "JSON?", "[{x: 1}]", "no")]


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_hh_rlhf_rows_with_the_same_two_conversations_are_dropped_and_counted(
        tmp_path, tokenizer, caplog, chunk_rows):
    """HH-RLHF holds pairs whose chosen and rejected are the same conversation (or one a prefix
    of the other): with an implicit prompt no completion is left. They stopped the run at the
    first of them; now they are dropped and counted in one warning, the other rows read as
    before — in chunks too."""
    same = {"chosen": hh("Hi", "Hello."), "rejected": hh("Hi", "Hello.")}
    prefix = {"chosen": hh("Hi", "Hello."), "rejected": hh("Hi", "Hello.", "More", "Yes")}
    rows = [HH_ROWS[0], same, HH_ROWS[1], prefix, same]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    kwargs = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        pairs = load(path, tokenizer, **kwargs)
    assert triples(pairs) == [trl_ids(tokenizer, None, r["chosen"], r["rejected"])
                              for r in (HH_ROWS[0], HH_ROWS[1])]
    lines = [r.getMessage() for r in caplog.records if "dropped: no prompt column" in
             r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("3 of 5 rows: dropped") \
        and "row 2" in lines[0], lines
    with pytest.raises(DpokitError, match=r"no rows left: all 2 are implicit-prompt rows"):
        load(write_jsonl(tmp_path / "same.jsonl", [same, same]), tokenizer, **kwargs)


def test_gzipped_json_lines_json_and_csv_read_as_the_plain_files(tmp_path):
    """Anthropic's HH-RLHF ships as ``train.jsonl.gz``/``test.jsonl.gz`` (no data files were
    found in its snapshot): the text formats are read gzip-compressed too — the same rows and
    row numbers as uncompressed, shards chosen by split, a broken stream one line."""
    import csv
    import gzip

    from dpokit.data.io import iter_rows

    rows = [{"chosen": hh("Hi", f"Hello {i} 😀"), "rejected": hh("Hi", "Go.")} for i in range(5)]
    plain = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    with open(tmp_path / "rows.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    for name in ("rows.jsonl", "rows.json", "rows.csv"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
        want = [(r.row, r.fields) for r in iter_rows(tmp_path / name)]
        got = [(r.row, r.fields) for r in iter_rows(tmp_path / f"{name}.gz")]
        assert got == want and len(got) == 5, name
    hub = tmp_path / "hh-rlhf"
    (hub / "harmless-base").mkdir(parents=True)
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        (hub / "harmless-base" / f"{split}.jsonl.gz").write_bytes(
            gzip.compress(plain.read_bytes().split(b"\n", 3)[-1] if split == "test" else
                          b"".join(json.dumps(r).encode() + b"\n" for r in part)))
    assert [r.fields for r in iter_rows(hub, split="train")] == rows[:3]
    with pytest.raises(DpokitError, match="shards of several splits"):
        list(iter_rows(hub))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(plain.read_bytes())[:-20])
    with pytest.raises(DpokitError, match=f"cannot read {re.escape(str(broken))}"):
        list(iter_rows(broken))
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DpokitError, match=r"unsupported file type '\.gz'"):
        list(iter_rows(tmp_path / "x.parquet.gz"))
