"""Rows → tokens against TRL 1.16's conventions (review): the SFT chat template gets a row's
``tools`` and ``chat_template_kwargs``; ``assistant_only_loss`` trains the template's
``{% generation %}`` span exactly; and DPO chat rows through templates that add a BOS, a
generation prompt the full conversation drops, or tools, equal an independent re-implementation
of TRL's ``tokenize_fn`` (prompt alone with the generation prompt, prompt + completion without,
the completion starting where they diverge)."""

import copy
import json

import pytest

from dpokit.data import RawRow, TokenizeSettings, parse_examples, tokenize_examples
from dpokit.data.sft import load_sft_sequences
from dpokit.errors import DpokitError
from dpokit.fixtures import CHAT_TEMPLATE

USER = {"role": "user", "content": "what color is the sky?"}
SYSTEM = {"role": "system", "content": "be brief"}


def assistant(text):
    return {"role": "assistant", "content": text}


TOOLS_TEMPLATE = ("{% if tools %}<|tools|>{% for t in tools %}{{ t['name'] }};{% endfor %}\n"
                  "{% endif %}{% if flag %}FLAG\n{% endif %}" + CHAT_TEMPLATE)
"""Renders the tools' names and, with ``chat_template_kwargs: {flag: true}``, a FLAG line."""

GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
"""An assistant mask of ``content</s>``: the newline after it is the template's, untrained."""

LEADING_NEWLINE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ '\\n' + m['content'] + '</s>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
"""Qwen 2.5's training template's shape: the mask starts at the newline that ends the
generation prompt, so in a ``messages`` row it reaches one token into the prompt side."""


def with_template(tokenizer, template):
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


def write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_ids(tokenizer, messages, **kwargs):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              **kwargs)["input_ids"])


def pieces(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


# --- SFT: the row's tools and chat_template_kwargs --------------------------------------------

def test_sft_rows_tools_and_chat_template_kwargs_reach_the_template(tokenizer, tmp_path):
    """TRL's SFT tokenize_fn passes ``tools`` (a list or its JSON text) and
    ``chat_template_kwargs`` to ``apply_chat_template``, for ``messages`` and conversational
    prompt-completion rows alike; they were dropped, so the model trained on a prompt without
    its tool schema."""
    tok = with_template(tokenizer, TOOLS_TEMPLATE)
    tools = [{"name": "get_weather"}]
    rows = [{"messages": [USER, assistant("blue")], "tools": json.dumps(tools),
             "chat_template_kwargs": {"flag": True}},
            {"prompt": [SYSTEM, USER], "completion": [assistant("green sea")], "tools": tools}]
    got = load_sft_sequences(write(tmp_path, rows), tok, completion_only_loss=None)
    first = chat_ids(tok, [USER, assistant("blue")], tools=tools, flag=True)
    assert got[0].prompt_ids + got[0].completion_ids == first  # every token (TRL's rule)
    assert tok.decode(first).startswith("<|tools|>get_weather;FLAG\n<|user|>")
    prompt = chat_ids(tok, [SYSTEM, USER], tools=tools, add_generation_prompt=True)
    second = chat_ids(tok, [SYSTEM, USER, assistant("green sea")], tools=tools)
    assert got[1].prompt_ids == prompt and got[1].prompt_ids + got[1].completion_ids == second
    assert tok.decode(got[1].completion_ids) == "green sea</s>\n"


# --- SFT: assistant_only_loss is the template's assistant mask ----------------------------------

@pytest.mark.parametrize("completion_only_loss", [None, True, False])
def test_assistant_only_loss_trains_the_generation_span_not_the_template_after_it(
        tokenizer, tmp_path, completion_only_loss):
    """TRL trains the tokens of ``{% generation %}``: ``blue sky</s>``, not the newline the
    template puts after it (which dpokit trained: the completion was everything after the
    generation prompt). The sequence stops at the span — later tokens cannot change it."""
    tok = with_template(tokenizer, GENERATION_TEMPLATE)
    conversation = [SYSTEM, USER, assistant("blue sky")]
    rows = [{"messages": conversation},
            {"prompt": conversation[:2], "completion": [conversation[2]]}]
    full = chat_ids(tok, conversation)
    assert pieces(tok, full)[-4:] == ["blue", " sky", "</s>", "\n"]
    for got in load_sft_sequences(write(tmp_path, rows), tok,
                                  completion_only_loss=completion_only_loss,
                                  assistant_only_loss=True):
        assert got.prompt_ids + got.completion_ids == full[:-1]
        assert pieces(tok, got.completion_ids) == ["blue", " sky", "</s>"]


def test_assistant_only_loss_mask_reaching_into_the_generation_prompt(tokenizer, tmp_path):
    """A mask that starts at the newline ending the generation prompt (Qwen 2.5's training
    template): a ``messages`` row trains that newline too (TRL: the assistant mask alone); a
    prompt-completion row trains its part in the completion (TRL: the assistant mask AND the
    completion mask), unless ``completion_only_loss`` is False."""
    tok = with_template(tokenizer, LEADING_NEWLINE_TEMPLATE)
    conversation = [USER, assistant("blue")]
    full = chat_ids(tok, conversation)
    prompt = chat_ids(tok, [USER], add_generation_prompt=True)
    assert full[:len(prompt)] == prompt and pieces(tok, prompt)[-1] == "\n"
    messages = write(tmp_path, [{"messages": conversation}])
    (got,) = load_sft_sequences(messages, tok, assistant_only_loss=True)
    assert got.prompt_ids == prompt[:-1] and got.completion_ids == full[len(prompt) - 1:]
    pc = write(tmp_path, [{"prompt": [USER], "completion": [conversation[1]]}])
    for completion_only_loss, start in ((True, len(prompt)), (None, len(prompt)),
                                        (False, len(prompt) - 1)):
        (got,) = load_sft_sequences(pc, tok, assistant_only_loss=True,
                                    completion_only_loss=completion_only_loss)
        assert got.prompt_ids == full[:start] and got.completion_ids == full[start:]


@pytest.mark.parametrize("limit", [3, 4, 6, 9, 12])
def test_assistant_only_loss_keep_end_counts_the_untrained_tail(tokenizer, tmp_path, limit):
    """TRL's keep_end keeps the last ``max_length`` tokens of the whole rendering, the
    template's newline after the span included: the prompt keeps one token fewer than if the
    span ended the sequence. Oracle: TRL's window ``full[-L:]`` and its label mask."""
    tok = with_template(tokenizer, GENERATION_TEMPLATE)
    conversation = [USER, assistant("blue sky")]
    full = chat_ids(tok, conversation)
    span_start = len(full) - 4  # blue, " sky", </s> are trained; "\n" is not
    window = full[-limit:]
    trained = [i >= span_start and i < len(full) - 1 for i in range(len(full))][-limit:]
    (got,) = load_sft_sequences(write(tmp_path, [{"messages": conversation}]), tok,
                                assistant_only_loss=True,
                                settings=TokenizeSettings(max_length=limit,
                                                          truncation_mode="keep_end"))
    assert got.prompt_ids + got.completion_ids == window[:-1]
    # the first token of a sequence is never predicted: TRL trains trained[1:]
    kept_trained = [False] * len(got.prompt_ids) + [True] * len(got.completion_ids)
    assert kept_trained[1:] == trained[1:-1]


def test_assistant_only_loss_refuses_several_mask_spans(tokenizer, tmp_path):
    """A prompt-completion row whose prompt holds an assistant turn, with completion_only_loss
    False, has two assistant spans (TRL trains both); dpokit trains one span a row and says so
    in one line rather than silently training the last turn only."""
    tok = with_template(tokenizer, GENERATION_TEMPLATE)
    rows = [{"prompt": [USER, assistant("blue"), USER], "completion": [assistant("no")]}]
    path = write(tmp_path, rows)
    with pytest.raises(DpokitError, match=r"row 1: assistant_only_loss: .*several spans"):
        load_sft_sequences(path, tok, assistant_only_loss=True, completion_only_loss=False)
    (got,) = load_sft_sequences(path, tok, assistant_only_loss=True)  # the completion's span
    assert tok.decode(got.completion_ids) == "no</s>"


# --- DPO: chat templates against a re-implementation of TRL's tokenize_fn ------------------------

def trl_dpo_ids(tokenizer, row):
    """TRL 1.16 DPOTrainer's tokenize_fn for a conversational row (re-implemented): the prompt
    with the generation prompt, prompt + chosen / rejected without, ``tools`` parsed from JSON
    text, ``chat_template_kwargs`` spread; the prompt is the shorter common prefix."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"tools": tools, **row.get("chat_template_kwargs", {})}
    prompt = chat_ids(tokenizer, row["prompt"], add_generation_prompt=True, **kwargs)
    chosen = chat_ids(tokenizer, row["prompt"] + row["chosen"], **kwargs)
    rejected = chat_ids(tokenizer, row["prompt"] + row["rejected"], **kwargs)

    def shared(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    n = min(shared(prompt, chosen), shared(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


THINK_TEMPLATE = CHAT_TEMPLATE.replace("<|assistant|>\n{% endif %}",
                                       "<|assistant|>\n<think></think>{% endif %}")
"""A generation prompt the full conversation does not contain (Gemma 4's empty thought)."""


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, "{{ bos_token }}" + CHAT_TEMPLATE,
                                      THINK_TEMPLATE, TOOLS_TEMPLATE],
                         ids=["plain", "bos", "think", "tools"])
def test_dpo_chat_rows_equal_trls_tokenize_fn(tokenizer, template):
    tok = with_template(tokenizer, template)
    rows = [
        {"prompt": [SYSTEM, USER], "chosen": [assistant("blue")],
         "rejected": [assistant("green sea")], "tools": '[{"name": "get_weather"}]',
         "chat_template_kwargs": {"flag": True}},
        {"prompt": [USER, assistant("blue"), {"role": "user", "content": "sure? ☃ 文字"}],
         "chosen": [assistant("yes")], "rejected": [assistant("no"), USER, assistant("x")],
         "tools": '[{"name": "get_weather"}]', "chat_template_kwargs": {"flag": True}},
    ]
    pairs = tokenize_examples(parse_examples([RawRow("d.jsonl", i + 1, r)
                                              for i, r in enumerate(rows)]), tok,
                              TokenizeSettings(max_length=None))
    for pair, row in zip(pairs, rows, strict=True):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == trl_dpo_ids(tok, row)
    if template == "{{ bos_token }}" + CHAT_TEMPLATE:  # the template's BOS, not doubled
        assert pairs[0].prompt_ids.count(tok.bos_token_id) == 1
    if template == THINK_TEMPLATE:  # the thought is left out: the completion starts before it
        assert "<think>" not in tok.decode(pairs[0].prompt_ids + pairs[0].chosen_ids)
