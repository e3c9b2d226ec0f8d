"""Helpers shared by the test modules: the in-process CLI, data files, the float64 log-prob
oracle and the four pair layouts. (Fixtures shared across modules live in conftest.py.)"""

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from dpokit.data import RawRow, parse_examples, tokenize_examples
from dpokit.data.collate import collate_packed, collate_padded, collate_shared

PROMPTS = ["the cat", "the dog", "what color is the sky?", "a bird", "why is the sun red?"]
"""Prompts of the ``workdir`` fixture's learnable preference set."""

LAYOUTS = {
    "right": lambda pairs: collate_padded(pairs, pad_token_id=0),
    "left": lambda pairs: collate_padded(pairs, pad_token_id=0, padding_side="left"),
    "packed": collate_packed,
    "shared": lambda pairs: collate_shared(pairs, pad_token_id=0),
}
"""Every way a batch of pairs is laid out for the model (right/left padding, packed, shared)."""


def run_cli(capsys, *argv):
    """``dpokit ARGV`` in this process: (exit status, stdout, stderr)."""
    from dpokit.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, rows):
    """``rows`` as a JSON-lines file at ``path``; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_metrics(run_dir):
    """The records of ``run_dir/metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def tokenized_pairs(rows, tokenizer, source="t.jsonl"):
    """Preference rows (dicts) through dpokit's parser and tokenizer."""
    raw = [RawRow(source, i + 1, r) for i, r in enumerate(rows)]
    return tokenize_examples(parse_examples(raw), tokenizer)


def reference_token_logps(model, prompt_ids, completion_ids):
    """Per-token log π of the completion: one unpadded sequence, full logits, float64.

    Returns ``(token_logps, wpo)``: log π(y_t|·) and log π(y_t|·) − log Σ_v π(v|·)² per token."""
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        log_probs = model64(input_ids=ids).logits[0, :-1].log_softmax(-1)
    token_logps = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
    wpo = token_logps - torch.logsumexp(2 * log_probs, dim=-1)
    start = len(prompt_ids) - 1
    return token_logps[start:], wpo[start:]


def torchrun(*argv, timeout=300, env=None):
    """``torchrun --standalone --nproc-per-node 2 ARGV`` (one thread per process): the finished
    process (``returncode``, ``stdout``, ``stderr``). A run still going after ``timeout`` s
    fails the test with every process's Python stack — its group gets SIGABRT, which
    ``PYTHONFAULTHANDLER`` turns into a traceback dump — instead of a bare timeout that leaves
    the workers running."""
    import pytest

    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               "--nproc-per-node", "2", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
    if hung:  # the workers first (torchrun starts them in sessions of their own), then all
        family = _descendants(process.pid)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [process.pid, *family]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, err = process.communicate()
        pytest.fail(f"torchrun still running after {timeout} s; its stacks:\n{err[-12000:]}",
                    pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _descendants(pid):
    """Every process below ``pid`` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found[::-1]


def count_calls(monkeypatch, owner, name):
    """Wrap ``owner.name`` (a module's function) for the test: a list that gains one entry per
    call, the calls themselves passed through unchanged."""
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def k_completion_rows(n=14, seed=1):
    """``n`` prompts with 2–4 scored completions each (k-completion groups of 1–6 pairs)."""
    import random

    rng = random.Random(seed)
    words = ["red", "sea", "moon", "yes", "no"]
    rows = []
    for i in range(n):
        k = rng.choice([2, 3, 4])
        rows.append({"prompt": f"prompt {i}: what is it?",
                     "completions": [" ans" + f" {rng.choice(words)}" * (j + 1)
                                     for j in range(k)],
                     "scores": [rng.random() for _ in range(k)]})
    return rows


def save_policy_and_ref(root, tokenizer):
    """Two tiny Llamas (seeds 11 and 12) saved with ``tokenizer`` in ``root/policy`` and
    ``root/ref``: an evaluation's policy and reference; returns ``(policy, ref)``."""
    from dpokit.fixtures import tiny_causal_lm

    policy = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=11)
    ref = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=12)
    for name, model in (("policy", policy), ("ref", ref)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return policy, ref
