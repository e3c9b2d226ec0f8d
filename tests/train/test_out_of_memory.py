"""Running out of memory (CUDA's torch.OutOfMemoryError, the CPU allocator's RuntimeError) is a
one-line error naming the step, the micro-batch and what to change — exit 2, no traceback, the
last checkpoint intact and resumable; any other error stays a traceback (a bug)."""

import json

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.objectives.dpo import DPOObjective
from dpokit.train.loop import train
from tests.helpers import read_metrics, run_cli
from tests.train.test_trainer import assert_same_steps, config

CPU_MESSAGE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
               "allocate memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot "
               "allocate memory)")
"""The CPU allocator's message, as PyTorch 2.13 raises it (tests/test_memory.py provokes the
real one and checks it is recognised)."""


def fail_on_call(monkeypatch, n, error, where="forward", split=False):
    """DPOObjective.forward raises ``error`` on its ``n``-th call (``where="backward"``: the
    loss it returns raises it in backward). Unless ``split``, the loop may not answer by
    halving the micro-batches (test_smaller_micro_batches_… test that)."""
    import dpokit.train.loop as loop

    if not split:
        monkeypatch.setattr(loop, "_can_split", lambda run, units=None: False)
    calls = {"n": 0}
    original = DPOObjective.forward

    def forward(self, policy, batch):
        out = original(self, policy, batch)
        calls["n"] += 1
        if calls["n"] != n:
            return out
        if where == "forward":
            raise error

        class Raise(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                raise error

        return type(out)(**{**vars(out), "loss_sum": Raise.apply(out.loss_sum)})

    monkeypatch.setattr(DPOObjective, "forward", forward)


def cli_args(workdir, out, *extra):
    return ("train", "--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
            "--output-dir", str(out), "--batch-size", "4", "--logging-steps", "1",
            "--max-length", "64", "--beta", "0.5", "--lr-scheduler", "constant",
            "--max-steps", "4", "--save-steps", "1", *extra)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_in_a_step_is_one_line_and_resumable(workdir, tmp_path, capsys,
                                                           monkeypatch, where):
    out = tmp_path / "run"
    fail_on_call(monkeypatch, 3, RuntimeError(CPU_MESSAGE), where)
    code, _, err = run_cli(capsys, *cli_args(workdir, out))
    lines = [line for line in err.replace("\r", "\n").splitlines() if "dpokit: error" in line]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    line = lines[0]
    assert ("step 3: out of memory on cpu (it asked for 8.00 GiB more) in a micro-batch of 4 "
            "pairs") in line
    assert "prefs.jsonl, row " in line  # the longest row, named
    assert "set gradient_checkpointing: true" in line and "lower batch_size" in line
    assert "checkpoint-2" in line and "is intact" in line
    assert not (out / "final").exists()
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--resume", "auto"))
    assert code == 0, err[-2000:]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4]


def test_full_recomputation_is_not_advised_twice(workdir, monkeypatch):
    fail_on_call(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                        "2.00 GiB"))
    pattern = (r"step 1: out of memory on cpu \(it asked for 2.00 GiB more\) .*recomputation "
               r"full\): lower batch_size.*no checkpoint saved")
    with pytest.raises(DpokitError, match=pattern) as error:
        train(config(workdir, "oom-full", gradient_checkpointing=True), progress=False)
    assert "gradient_checkpointing" not in str(error.value)


def test_no_recomputation_advice_for_a_model_that_cannot_recompute(workdir, monkeypatch):
    import dpokit.train.loop as loop

    monkeypatch.setattr(loop, "supports_recompute", lambda model: False)
    fail_on_call(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory."))
    with pytest.raises(DpokitError, match=r"recomputation none\): lower batch_size") as error:
        train(config(workdir, "oom-no-recompute"), progress=False)
    assert "gradient_checkpointing" not in str(error.value)


def test_out_of_memory_in_the_optimizer_step_names_adamw(workdir, monkeypatch):
    """AdamW allocates its moments at the first step: the advice is about the trained weights,
    not the activations."""
    def step(self, optimizer, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    with pytest.raises(DpokitError) as error:
        train(config(workdir, "oom-adamw"), progress=False)
    message = str(error.value)
    assert message.startswith("step 1: out of memory on cpu (it asked for 0.06 GiB more) in "
                              "the optimizer step")
    assert "lora: true" in message and "fsdp: true" in message
    assert "gradient_checkpointing" not in message
    assert "no checkpoint saved" in message


def test_out_of_memory_while_loading_says_the_weights_may_not_fit(workdir, monkeypatch):
    import dpokit.train.setup as setup

    def load(*args, **kwargs):
        raise RuntimeError(CPU_MESSAGE)

    monkeypatch.setattr(setup, "load_causal_lm", load)
    with pytest.raises(DpokitError, match=r"^setup: out of memory on cpu \(\[enforce fail.*\): "
                                          r"the weights may not fit"):
        train(config(workdir, "oom-load", precompute_ref_logps=False), progress=False)


def test_other_errors_stay_tracebacks(workdir, monkeypatch):
    fail_on_call(monkeypatch, 1, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(config(workdir, "oom-other"), progress=False)


def limit_pairs(monkeypatch, limit):
    """DPOObjective.forward runs out of memory on a batch of more than ``limit`` pairs."""
    original = DPOObjective.forward

    def forward(self, policy, batch):
        if batch.num_pairs > limit:
            raise RuntimeError(CPU_MESSAGE)
        return original(self, policy, batch)

    monkeypatch.setattr(DPOObjective, "forward", forward)


def test_smaller_micro_batches_give_the_same_steps(workdir, monkeypatch, caplog):
    """A fake limit of 3 pairs a forward: batch_size 4 goes on at 2 (one warning, at step 1)
    and trains as batch_size 2 × 2 accumulation steps does — losses and gradient norms equal,
    weights within float32 rounding (an accumulated step equals the step on the union)."""
    limit_pairs(monkeypatch, 3)
    with caplog.at_level("WARNING", logger="dpokit.train"):
        split = train(config(workdir, "oom-split", batch_size=4, max_steps=3), progress=False)
    assert caplog.text.count("out of memory at 4 pairs a micro-batch; going on at 2") == 1
    assert "step 1: out of memory" in caplog.text
    plain = train(config(workdir, "oom-accumulated", batch_size=2,
                         gradient_accumulation_steps=2, max_steps=3), progress=False)
    assert_same_steps(split, plain, steps=3)


def test_one_pair_that_does_not_fit_is_the_one_line_error(workdir, monkeypatch):
    """Halving stops at one unit: 4 → 2 → 1, then the error names the micro-batch."""
    limit_pairs(monkeypatch, 0)
    with pytest.raises(DpokitError, match=r"^step 1: out of memory on cpu \(it asked for 8.00 "
                                          r"GiB more\) in a micro-batch of 1 pairs"):
        train(config(workdir, "oom-one", batch_size=4, max_steps=1), progress=False)


def test_halving_only_where_it_gives_the_same_step(workdir):
    """Not under torchrun (ranks must run the same forwards), not on-policy (generation draws
    from the RNG), not with dropout, not at one unit."""
    from types import SimpleNamespace

    from dpokit.objectives.online import OnlineDPOObjective
    from dpokit.train.loop import _can_split

    def objective(cls=DPOObjective, loss_type=("sigmoid",)):
        made = cls.__new__(cls)
        made.config = SimpleNamespace(loss_type=list(loss_type))
        return made

    def run(**changes):
        values = {"micro_batch": 4, "runtime": SimpleNamespace(distributed=False),
                  "config": SimpleNamespace(disable_dropout=True),
                  "objective": objective(), **changes}
        return SimpleNamespace(**values)

    assert _can_split(run())
    assert _can_split(run(objective=objective(loss_type=("sigmoid", "ipo", "apo_zero"))))
    assert not _can_split(run(micro_batch=1))
    # a short last micro-batch of one unit fails at any size: no halving, the error at once
    assert not _can_split(run(), 1) and _can_split(run(), 2)
    assert not _can_split(run(runtime=SimpleNamespace(distributed=True)))
    assert not _can_split(run(config=SimpleNamespace(disable_dropout=False)))
    assert not _can_split(run(objective=objective(OnlineDPOObjective)))
    for coupled in (("sigmoid", "sft"), ("aot",), ("aot_unpaired",)):  # micro-batch terms
        assert not _can_split(run(objective=objective(loss_type=coupled))), coupled


def test_a_loss_that_couples_the_micro_batch_is_not_halved(workdir, tmp_path, monkeypatch):
    """loss_type [sigmoid, sft]: the sft term is the micro-batch's token mean, so halving would
    change the step — training and evaluation stop with the one-line error instead, and the
    memory plan does not halve either (it warns)."""
    import dpokit.memory
    from dpokit.evaluate import EvalConfig, run_eval

    limit_pairs(monkeypatch, 3)
    with pytest.raises(DpokitError, match=r"^step 1: out of memory on cpu .* micro-batch of 4 "
                                          r"pairs"):
        train(config(workdir, "oom-coupled", batch_size=4, max_steps=1,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), progress=False)
    with pytest.raises(DpokitError, match=r"^evaluation: out of memory on cpu .* batch of 4 "
                                          r"pairs"):
        run_eval(EvalConfig(model=str(workdir / "llama"), ref_model=str(workdir / "llama"),
                            data=str(workdir / "prefs.jsonl"), max_length=64, batch_size=4,
                            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                 progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: 0)
    sizes, forward = [], DPOObjective.forward
    monkeypatch.setattr(DPOObjective, "forward", lambda self, policy, batch: (
        sizes.append(batch.num_pairs), forward(self, policy, batch))[1])
    train(config(workdir, "plan-coupled", batch_size=4, max_steps=1,
                 loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), progress=False)
    assert sizes == [4]


def test_the_reference_pass_halves_a_batch_that_does_not_fit(workdir, caplog):
    """A fake memory limit of 3 pairs a batch: the pass asked for 8 goes on at 4, then 2, and
    its table equals the one computed at 2 pairs a batch from the start, bit for bit (a row's
    log-probs do not depend on its batch); at 1 pair a batch too large it raises."""
    from dpokit.models import load_causal_lm, load_tokenizer
    from dpokit.objectives.reference import Reference, compute_reference_table
    from tests.helpers import tokenized_pairs

    tokenizer = load_tokenizer(workdir / "llama")
    rows = [json.loads(x) for x in (workdir / "prefs.jsonl").read_text().splitlines()][:11]
    pairs = tokenized_pairs(rows, tokenizer)
    model = load_causal_lm(workdir / "llama")

    sizes = []

    class Limited(Reference):
        limit = 3

        def logps(self, batch):
            pairs_here = batch.num_pairs
            sizes.append(pairs_here)
            if pairs_here > self.limit:
                raise RuntimeError(CPU_MESSAGE)
            return super().logps(batch)

    common = {"pad_token_id": tokenizer.pad_token_id, "layout": "shared",
              "device": torch.device("cpu")}
    expected = compute_reference_table(Reference("model", model=model), pairs, batch_size=2,
                                       **common)
    limited = Limited("model", model=model)
    with caplog.at_level("WARNING", logger="dpokit.train"):
        table = compute_reference_table(limited, pairs, batch_size=8, **common)
    assert torch.equal(table, expected)
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 1]  # 11 pairs: 2+2+2+2+2+1 after the halvings
    assert caplog.text.count("going on at") == 2
    limited.limit = 0
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        compute_reference_table(limited, pairs, batch_size=8, **common)


def test_out_of_memory_at_one_example_in_the_reference_pass_is_one_line(workdir, tmp_path,
                                                                       monkeypatch):
    """(The run directory is new, so is its reference cache: the pass runs.)"""
    import dpokit.train.setup as setup

    def compute(*args, **kwargs):
        raise RuntimeError(CPU_MESSAGE)

    monkeypatch.setattr(setup, "compute_reference_table", compute)
    with pytest.raises(DpokitError, match=r"reference pass over the training examples: out of "
                                          r"memory on cpu \(it asked for 8.00 GiB more\) even at "
                                          r"one example a batch \(halved from "
                                          r"precompute_ref_batch_size 6\).*lower max_length"):
        train(config(workdir, "oom-ref", precompute_ref_batch_size=6,
                     output_dir=str(tmp_path / "run")), progress=False)


def test_the_reference_pass_names_the_row_that_does_not_fit(workdir, tmp_path, monkeypatch):
    """Nothing fits: the real pass halves 6 → 3 → 1 and the one line names the pair that did
    not fit at one example a batch (its file, row and tokens)."""
    from dpokit.objectives.reference import Reference

    def logps(self, batch):
        raise RuntimeError(CPU_MESSAGE)

    monkeypatch.setattr(Reference, "logps", logps)
    with pytest.raises(DpokitError, match=r"even at one example a batch \(halved from "
                                          r"precompute_ref_batch_size 6: .*prefs\.jsonl, row "
                                          r"\d+, 1 pair\(s\), \d+ tokens\)"):
        train(config(workdir, "oom-ref-row", precompute_ref_batch_size=6,
                     output_dir=str(tmp_path / "run")), progress=False)


def test_out_of_memory_outside_a_step_is_one_line_too(workdir, monkeypatch):
    """E.g. in an evaluation between steps: named by the step before it."""
    import dpokit.train.loop as loop

    def evaluate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(loop, "evaluate", evaluate)
    with pytest.raises(DpokitError, match=r"after step 2: out of memory on cpu \(CUDA out of "
                                          r"memory. Tried to allocate 1.00 GiB\); lower.*; "
                                          r"no checkpoint saved$"):
        train(config(workdir, "oom-eval", eval_steps=2, eval_data=str(workdir / "prefs.jsonl")),
              progress=False)


@pytest.mark.parametrize(("error", "one_line"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB"), True),
    (RuntimeError(CPU_MESSAGE), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
])
def test_any_command_that_runs_out_of_memory_says_so_in_one_line(workdir, capsys, monkeypatch,
                                                                 error, one_line):
    """The CLI's last safety net (here `dpokit eval`): an allocation failure no command turned
    into its own line is one line, exit 2; any other exception stays a traceback."""
    import dpokit.evaluate

    def run_eval(*args, **kwargs):
        raise error

    monkeypatch.setattr(dpokit.evaluate, "run_eval", run_eval)
    argv = ("eval", "--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"))
    if not one_line:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            run_cli(capsys, *argv)
        return
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"dpokit: error: out of memory ({str(error).splitlines()[0]}); lower the batch size "
        f"(batch_size, per_device_eval_batch_size) or max_length"]


def test_evaluation_halves_a_batch_that_does_not_fit(workdir, tmp_path, monkeypatch, caplog):
    """``dpokit eval`` under a fake limit of 3 pairs a forward: batch 8 goes on at 4, then 2
    (two warnings), and its metrics and per-example records equal an evaluation at 2 pairs a
    batch from the start (each pair is scored on its own: float64 sums, 1e-12)."""
    from dpokit.evaluate import EvalConfig, run_eval

    def evaluation(batch_size, name):
        return run_eval(EvalConfig(model=str(workdir / "llama"), ref_model=str(workdir / "llama"),
                                   data=str(workdir / "prefs.jsonl"), max_length=64,
                                   batch_size=batch_size, per_example=str(tmp_path / name)),
                        progress=False)

    expected = evaluation(2, "plain.jsonl")
    limit_pairs(monkeypatch, 3)
    with caplog.at_level("WARNING", logger="dpokit"):
        halved = evaluation(8, "halved.jsonl")
    assert caplog.text.count("evaluation: out of memory at") == 2
    assert "at 8 pairs a batch; going on at 4" in caplog.text
    assert "at 4 pairs a batch; going on at 2" in caplog.text
    assert halved.batch_size == 2 and expected.batch_size == 2
    assert halved.num_examples == expected.num_examples == 48
    assert halved.metrics.keys() == expected.metrics.keys()
    for key, value in expected.metrics.items():
        assert halved.metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert halved.per_example == expected.per_example


def test_evaluation_at_one_pair_that_does_not_fit_is_one_line(workdir, capsys, monkeypatch):
    """Halving stops at one pair: `dpokit eval` ends with one line naming the batch's row."""
    limit_pairs(monkeypatch, 0)
    code, _, err = run_cli(capsys, "eval", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--batch-size", "4")
    lines = [line for line in err.replace("\r", "\n").splitlines() if "dpokit: error" in line]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("dpokit: error: evaluation: out of memory on cpu (it asked for "
                               "8.00 GiB more) in a batch of 1 pairs, ")
    assert "prefs.jsonl, row 1, " in lines[0] and "lower batch_size" in lines[0]


def test_evaluation_in_training_goes_on_at_the_halved_size(workdir, monkeypatch, caplog):
    """In training, the first evaluation halves once (eval batch 4 → 2 under a limit of 3
    pairs) and the later ones start at 2; the logged eval metrics equal those of a run whose
    eval batch is 2 from the start. At one pair the error names the step and the checkpoint."""
    data = str(workdir / "prefs.jsonl")
    common = {"batch_size": 2, "max_steps": 4, "eval_steps": 2, "eval_data": data,
              "per_device_eval_batch_size": 4}
    limit_pairs(monkeypatch, 3)
    with caplog.at_level("WARNING", logger="dpokit"):
        halved = train(config(workdir, "oom-eval-halved", **common), progress=False)
    assert caplog.text.count("evaluation: out of memory at 4 pairs a batch; going on at 2") == 1
    plain = train(config(workdir, "oom-eval-plain", **{**common,
                                                       "per_device_eval_batch_size": 2}),
                  progress=False)
    evals = [[m for m in read_metrics(run.parent) if "eval/loss" in m] for run in (halved, plain)]
    assert [m["step"] for m in evals[0]] == [m["step"] for m in evals[1]] == [2, 4]
    for x, y in zip(*evals, strict=True):
        assert x["eval/loss"] == pytest.approx(y["eval/loss"], rel=1e-9)
    monkeypatch.undo()
    original = DPOObjective.forward

    def forward(self, policy, batch):  # evaluation runs without grad: there, nothing fits
        if not torch.is_grad_enabled():
            raise RuntimeError(CPU_MESSAGE)
        return original(self, policy, batch)

    monkeypatch.setattr(DPOObjective, "forward", forward)
    with pytest.raises(DpokitError, match=r"^after step 2: evaluation: out of memory on cpu .* "
                                          r"in a batch of 1 pairs, .*; no checkpoint saved$"):
        train(config(workdir, "oom-eval-one", **common), progress=False)
