"""From a review of ``dpokit.runtime`` and ``dpokit.train.fingerprint``: torchrun's environment
and devices refused with one line (not a traceback, not a silent rank-1 run), the process group
destroyed only by whoever started it, every RNG stream seeded and restored, the collectives
under real ``torchrun`` (gloo), and every config key classified for resume — a key added later
and left out of the tables below fails here."""

import dataclasses
import json
import random
import textwrap
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dpokit import runtime
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError
from dpokit.train.config import DPOConfig, SFTConfig
from dpokit.train.fingerprint import MAY_CHANGE, SAMPLING_KEYS, check_same_run, run_fingerprint
from tests.helpers import torchrun

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


@pytest.fixture
def one_process(monkeypatch):
    """No torchrun variables inherited from the shell running the tests."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- torchrun's environment


@pytest.mark.parametrize(("env", "named"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "2", "RANK": "x1"}, "RANK='x1'"),
    ({"RANK": "1"}, "RANK=1"),  # old: a one-process run as rank 1, writing nothing
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     "LOCAL_RANK=2"),
])
def test_a_malformed_torchrun_environment_is_one_line_naming_the_variable(one_process, env,
                                                                          named):
    """Old: ``int('two')``'s bare ValueError, or (RANK=1 alone) a Runtime with is_main False
    that would write no config, metrics or model and exit 0."""
    for name, value in env.items():
        one_process.setenv(name, value)
    with pytest.raises(DpokitError, match=named):
        runtime.setup_runtime("cpu")


def test_world_size_without_a_rendezvous_address_is_one_line(one_process):
    """WORLD_SIZE=2 set by hand (no torchrun): old, init_process_group's ValueError traceback
    ("environment variable MASTER_ADDR expected"); now one line naming MASTER_ADDR."""
    one_process.setenv("WORLD_SIZE", "2")
    one_process.setenv("RANK", "0")
    with pytest.raises(DpokitError, match=r"MASTER_ADDR=\(unset\).*launch with torchrun"):
        runtime.setup_runtime("cpu", timeout_s=5)
    assert not dist.is_initialized()


@pytest.fixture
def one_gpu(one_process):
    """A machine that shows one CUDA device (bfloat16 capable unless a test says otherwise)."""
    chosen = []
    one_process.setattr(torch.cuda, "is_available", lambda: True)
    one_process.setattr(torch.cuda, "device_count", lambda: 1)
    one_process.setattr(torch.cuda, "set_device", chosen.append)
    one_process.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    one_process.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    one_process.setattr(dist, "is_initialized", lambda: True)  # no group is started here
    return chosen


def test_more_processes_per_node_than_gpus_is_one_line(one_gpu, one_process):
    """LOCAL_RANK 1 on a machine with one GPU: old, ``torch.cuda.set_device(1)``'s error
    ("invalid device ordinal") as a traceback on that rank."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        one_process.setenv(name, value)
    with pytest.raises(DpokitError, match=r"cuda:1 \(LOCAL_RANK 1\) does not exist.*1 GPU"
                                          r".*--nproc-per-node"):
        runtime.setup_runtime("auto")
    assert one_gpu == []
    one_process.setenv("LOCAL_RANK", "0")
    one_process.setenv("RANK", "0")
    assert runtime.setup_runtime("cuda").device == torch.device("cuda", 0)
    assert one_gpu == [torch.device("cuda", 0)]


def test_a_gpu_index_is_checked_and_not_silently_replaced_under_torchrun(one_gpu, one_process):
    """One process: cuda:3 on a one-GPU machine is one line (old: set_device's traceback).
    Under torchrun, cuda:1 was silently replaced by each rank's LOCAL_RANK GPU: refused."""
    with pytest.raises(DpokitError, match=r"cuda:3 does not exist: this machine shows 1"):
        runtime.setup_runtime("cuda:3")
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        one_process.setenv(name, value)
    with pytest.raises(DpokitError, match=r"device='cuda:1' names one GPU.*use device cuda"):
        runtime.setup_runtime("cuda:1")


def test_bf16_on_a_gpu_without_bfloat16_is_refused_before_training(one_gpu, one_process):
    """Old: accepted, then torch.autocast raised "Current CUDA Device does not support
    bfloat16" inside the first forward, as a traceback."""
    one_process.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(DpokitError, match="bf16 needs a GPU with bfloat16 support; Tesla T4"):
        runtime.setup_runtime("cuda", "bfloat16")
    assert runtime.setup_runtime("cuda", "float32").dtype == "float32"


def test_mps_where_there_is_none_is_one_line(one_process):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DpokitError, match="device='mps' but MPS is not available"):
        runtime.setup_runtime("mps")


def test_autocast_computes_in_the_precision_asked_for(one_process):
    """bf16 on the CPU: a matmul under the context is bfloat16; float32: no autocast; fp16 on
    the CPU falls back to float32 (said in the log)."""
    a = torch.ones(2, 2)
    bf16 = runtime.setup_runtime("cpu", "bfloat16")
    with bf16.autocast():
        assert (a @ a).dtype == torch.bfloat16
    for dtype in ("float32", "float16"):
        state = runtime.setup_runtime("cpu", dtype)
        assert state.dtype == "float32"
        with state.autocast():
            assert (a @ a).dtype == torch.float32


def test_shutdown_leaves_a_process_group_the_caller_started(one_process, tmp_path):
    """A library caller's own group (here a one-member gloo group; the environment says two
    ranks, so the runtime is distributed): old, shutdown_runtime destroyed it, and the caller's
    next collective raised "Default process group has not been initialized"."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    try:
        one_process.setenv("WORLD_SIZE", "2")
        one_process.setenv("RANK", "0")
        state = runtime.setup_runtime("cpu")
        assert state.distributed and not state.owns_group
        runtime.shutdown_runtime(state)
        assert dist.is_initialized()
        dist.barrier()  # the caller's group still works
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- seeding and RNG states


def _draws() -> tuple:
    return (random.random(), random.gauss(0.0, 1.0), float(np.random.rand()),
            float(np.random.standard_normal()), torch.rand(3).tolist())


def test_seed_everything_seeds_numpy_too(one_process):
    """A reward function (TRL's signature) drawing from NumPy: old, unseeded — two runs with
    the same seed scored differently."""
    runtime.seed_everything(11)
    first = _draws()
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    runtime.seed_everything(11)
    assert _draws() == first


def test_the_rng_states_resume_every_stream_through_a_weights_only_load(tmp_path):
    """Save the states, draw, restore from a ``weights_only`` load, draw again: the same
    numbers, in the middle of a Gaussian pair (Python keeps the second of random.gauss's pair,
    NumPy its cached normal). Old: NumPy's stream was not saved and Python's cached Gaussian
    was dropped, so the resumed draws differed from the run's."""
    runtime.seed_everything(5)
    random.gauss(0.0, 1.0)  # one of a pair: the other is cached
    np.random.standard_normal()
    torch.save(runtime.rng_state(), tmp_path / "rng_0.pt")
    expected = _draws()
    runtime.seed_everything(99)
    runtime.set_rng_state(torch.load(tmp_path / "rng_0.pt", weights_only=True))
    assert _draws() == expected


def test_an_older_checkpoints_rng_state_still_restores():
    """A state without the NumPy and Gaussian entries (an older dpokit) restores what it has."""
    runtime.seed_everything(3)
    version, internal, _ = random.getstate()
    old = {"python": list(internal), "python_version": version, "torch": torch.get_rng_state()}
    expected = (random.random(), torch.rand(2).tolist())
    runtime.set_rng_state(old)
    assert (random.random(), torch.rand(2).tolist()) == expected


def test_cuda_states_of_more_gpus_than_this_machine_has(monkeypatch):
    """A checkpoint from a machine with 2 GPUs resumed on one with 1: old, set_rng_state_all
    got both states and failed on device 1."""
    given = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", given.append)
    runtime.seed_everything(1)
    state = {**runtime.rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8),
                                             torch.ones(16, dtype=torch.uint8)]}
    runtime.set_rng_state(state)
    assert len(given) == 1 and len(given[0]) == 1 and torch.equal(given[0][0], state["cuda"][0])


# ---------------------------------------------------------------- under torchrun (gloo)

RANKS_SCRIPT = textwrap.dedent("""
    import json, time

    import torch
    import torch.distributed as dist

    from dpokit.runtime import seed_everything, setup_runtime, shutdown_runtime

    out = {}
    rt = setup_runtime("cpu", timeout_s=6)
    out["owns"] = rt.owns_group
    out["where"] = [rt.rank, rt.world_size, rt.local_rank, str(rt.device), dist.get_backend()]
    big = torch.tensor([2**53 + rt.rank], dtype=torch.int64)  # not exact in float32/float64
    total = rt.all_reduce_sum(big)
    out["int_sum"] = [int(total.item()), str(total.dtype), int(big.item())]
    half = torch.tensor([0.1 * (rt.rank + 1)], dtype=torch.float64)
    out["float_sum"] = rt.all_reduce_sum(half).item()
    out["min"] = rt.all_reduce_min(torch.tensor([5.0 - rt.rank], dtype=torch.float64)).item()
    out["all_ok"] = [rt.all_ok(rt.rank == 0), rt.all_ok(True)]
    seed_everything(17)  # the same seed on every rank: the same streams
    draws = torch.rand(4)
    gathered = [torch.zeros(4) for _ in range(rt.world_size)]
    dist.all_gather(gathered, draws)
    out["same_streams"] = all(torch.equal(g, gathered[0]) for g in gathered)

    # timeout_s 6: rank 1 never joins the next collective, so rank 0's raises after ~6 s;
    # shutdown then destroys the group on both ranks without hanging
    if rt.rank == 0:
        start = time.perf_counter()
        try:
            rt.all_reduce_sum(torch.ones(1))
            out["timeout"] = None
        except Exception as error:
            out["timeout"] = [time.perf_counter() - start, type(error).__name__]
    else:
        time.sleep(18)
    shutdown_runtime(rt)
    out["after_own"] = dist.is_initialized()
    print("RESULT " + json.dumps({"rank": rt.rank, **out}), flush=True)
""")



@pytest.mark.slow
def test_collectives_shutdown_and_timeout_under_torchrun(tmp_path):
    """Two gloo ranks: the reductions are exact for int64 past 2**53 (a float32/float64 detour
    would round 2·2**53 + 1), sum/min/all_ok hold on both ranks, the input is left alone, the
    same seed gives the same streams, a rank missing from a collective makes the other's raise
    after ``timeout_s`` (6 s) instead of hanging, and shutdown then destroys the group that
    setup started on both ranks. (A group the caller started: the test above, in one process
    — gloo re-initialised in one torchrun process is flaky in this torch.)"""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    done = torchrun(script, timeout=120)
    results = {}
    for line in done.stdout.splitlines():
        if "RESULT " in line:
            result = json.loads(line.split("RESULT ", 1)[1])
            results[result["rank"]] = result
    assert 0 in results, done.stderr[-3000:]  # (torchrun may stop the slower rank)
    for rank, r in results.items():
        assert r["owns"] is True and r["where"] == [rank, 2, rank, "cpu", "gloo"]
        assert r["int_sum"] == [2 * 2**53 + 1, "torch.int64", 2**53 + rank]
        assert r["float_sum"] == pytest.approx(0.3, abs=1e-15)
        assert r["min"] == 4.0
        assert r["all_ok"] == [False, True]
        assert r["same_streams"] is True
        assert r["after_own"] is False
    seconds, kind = results[0]["timeout"]
    assert 5.5 <= seconds <= 17, seconds  # the 6 s timeout, not rank 1's 18 s sleep
    assert kind in {"RuntimeError", "DistError", "DistBackendError"}


# ---------------------------------------------------------------- the resume fingerprint

CHANGES_NUMBERS = {
    # optimisation and its schedule
    "learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed", "batch_size",
    "gradient_accumulation_steps", "disable_dropout", "fsdp",
    # the model, its precision and LoRA
    "model", "dtype", "bf16", "fp16", "trust_remote_code", "lora", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules",
    # the data and how rows become tokens (also in the rows' digest, kept explicit)
    "data", "prompt_column", "max_length", "max_prompt_length", "truncation_mode", "text_mode",
    # the preference loss and its reference
    "chosen_column", "rejected_column", "weight_column", "margin_column", "label_prob_column",
    "completions_column", "scores_column", "completion_column", "score_column",
    "pairs_from_scores", "ref_model", "beta", "loss_type", "loss_weights", "f_divergence_type",
    "f_alpha_divergence_coef", "rpo_alpha", "ld_alpha", "use_weighting", "sync_ref_model",
    "ref_model_mixup_alpha", "ref_model_sync_steps",
    # on-policy pairs (and their labels)
    "online", "num_generations", "label", "label_temperature", "missing_eos_penalty",
    # SFT's loss
    "messages_column", "text_column", "completion_only_loss", "assistant_only_loss",
    "loss_normalization",
}
"""Keys whose change changes the numbers of the steps to come: a resume refuses them."""

LOSS_HYPER_PARAMETERS = {"label_smoothing", "simpo_gamma", "bco_delta", "discopop_tau",
                         "dpop_lambda", "odpo_alpha"}
"""The loss registry's fields (PreferenceConfig makes one each): they change the loss."""

MAY_CHANGE_EXPECTED = {
    # bookkeeping, where it runs and where it writes
    "output_dir", "resume", "overwrite", "tokenized_cache", "device", "logging_steps",
    "report_to", "run_name", "project", "save_steps", "save_total_limit", "save_strategy",
    "dataset_num_proc", "ddp_timeout", "ddp_find_unused_parameters", "max_row_chars",
    # evaluation and what only the final save reads
    "eval_data", "eval_split", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
    "eval_generate", "merge_lora", "max_nonfinite_steps",
    # the run's length (check_length decides)
    "max_steps", "num_epochs",
    # memory and layout: the same numbers within float32 rounding
    "gradient_checkpointing", "selective_checkpointing", "chunk_size", "unpadded",
    "shared_prompt", "padding_free", "precompute_ref_logps", "precompute_ref_batch_size",
}
SAMPLING_EXPECTED = {"max_new_tokens", "temperature", "top_p", "top_k", "reward"}
COVERED_BY_THE_ROWS = {"split"}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_config_key_is_classified_for_resume():
    """Every field of DPOConfig and SFTConfig is in exactly one table: a key added later must
    be classified here (and in MAY_CHANGE when a resume may change it)."""
    tables = [CHANGES_NUMBERS | LOSS_HYPER_PARAMETERS, MAY_CHANGE_EXPECTED, SAMPLING_EXPECTED,
              COVERED_BY_THE_ROWS]
    every = _fields(DPOConfig) | _fields(SFTConfig)
    assert sum(map(len, tables)) == len(set().union(*tables))  # disjoint
    assert every == set().union(*tables), (every - set().union(*tables),
                                           set().union(*tables) - every)
    assert set(MAY_CHANGE) == MAY_CHANGE_EXPECTED
    assert set(SAMPLING_KEYS) == SAMPLING_EXPECTED


def _other(value, key, workdir):
    """A different value of the same kind."""
    if key in ("model", "ref_model"):
        return str(workdir / ("gpt2" if value != str(workdir / "gpt2") else "llama"))
    if key == "reward":
        return "some.module:other_reward"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.25
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["x"]
    assert value is None, (key, value)
    return 0.5


ITEMS = [TokenizedPair([1, 2, 3], [4, 5], [6], source="a.jsonl", row=i) for i in range(3)]


@pytest.mark.parametrize(("cls", "online"), [(DPOConfig, False), (DPOConfig, True),
                                             (SFTConfig, False)])
def test_each_key_resumes_or_is_refused_as_classified(workdir, cls, online):
    """For every key: a changed value changes the fingerprint — and a resume is refused with a
    line naming the key — exactly when the tables say it changes the numbers (the sampling
    keys only online)."""
    base = cls(model=str(workdir / "llama"), data=str(workdir / "prefs.jsonl"),
               **({"online": True, "reward": "pkg.mod:reward"} if online else {}))
    recorded = run_fingerprint(base, ITEMS)
    for key in sorted(_fields(cls) - {"data", "online"}):
        changed = dataclasses.replace(base, **{key: _other(getattr(base, key), key, workdir)})
        current = run_fingerprint(changed, ITEMS)
        refused = key in CHANGES_NUMBERS | LOSS_HYPER_PARAMETERS or (
            online and key in SAMPLING_EXPECTED)
        if not refused:
            assert current == recorded, key
            check_same_run(workdir, recorded, current)
            continue
        assert current != recorded, key
        with pytest.raises(DpokitError, match=rf"not the run that wrote .*\b{key}\b"):
            check_same_run(workdir, recorded, current)
    other_rows = run_fingerprint(base, ITEMS[:2])  # the data's rows, not its path
    with pytest.raises(DpokitError, match=r"data \(content differs\)"):
        check_same_run(workdir, recorded, other_rows)
    assert run_fingerprint(dataclasses.replace(base, data="elsewhere.jsonl"), ITEMS) == recorded


@pytest.mark.parametrize(("cls", "key", "other"), [
    (SFTConfig, "loss_normalization", "token"),
    (DPOConfig, "ld_alpha", 0.5),
    (DPOConfig, "loss_type", ["ipo"]),
])
def test_a_key_the_checkpoint_predates_keeps_its_default_meaning(workdir, cls, key, other):
    """A checkpoint written before ``key`` existed ran with its default: resuming with the
    default is the same run, with another value it is refused naming the key. Old: any value
    was accepted (the key was skipped), so e.g. loss_normalization token silently changed an
    old SFT run's loss."""
    base = cls(model=str(workdir / "llama"), data=str(workdir / "sft.jsonl"))
    recorded = run_fingerprint(base, ITEMS)
    recorded.pop(key)
    check_same_run(workdir, recorded, run_fingerprint(base, ITEMS))
    changed = run_fingerprint(dataclasses.replace(base, **{key: other}), ITEMS)
    with pytest.raises(DpokitError, match=rf"{key} .*\(the checkpoint predates the key\) → "):
        check_same_run(workdir, recorded, changed)


def test_a_checkpoint_from_before_disable_dropout_ran_with_dropout(workdir):
    """disable_dropout came with default true, but runs before it trained with dropout: such a
    checkpoint resumes with disable_dropout false, and is refused with the new default (old:
    accepted — dropout silently switched off mid-run)."""
    base = DPOConfig(model=str(workdir / "gpt2"), data=str(workdir / "prefs.jsonl"))
    recorded = run_fingerprint(base, ITEMS)
    recorded.pop("disable_dropout")
    with pytest.raises(DpokitError, match=r"disable_dropout false \(the checkpoint predates"):
        check_same_run(workdir, recorded, run_fingerprint(base, ITEMS))
    check_same_run(workdir, recorded,
                   run_fingerprint(dataclasses.replace(base, disable_dropout=False), ITEMS))



def test_a_resume_in_another_precision_is_refused(workdir):
    """``fp16: true`` on a CPU runs float32 (a warning); resumed on a GPU the same config runs
    float16 autocast — another run, with the same config keys, which was accepted. The
    precision the steps really run in is in the fingerprint; a checkpoint from before it
    resumes as before."""
    base = DPOConfig(model=str(workdir / "llama"), data=str(workdir / "prefs.jsonl"), fp16=True)
    on_cpu = run_fingerprint(base, ITEMS, autocast="float32")
    on_gpu = run_fingerprint(base, ITEMS, autocast="float16")
    with pytest.raises(DpokitError, match=r"autocast float32 → float16"):
        check_same_run(workdir, on_cpu, on_gpu)
    check_same_run(workdir, on_cpu, run_fingerprint(base, ITEMS, autocast="float32"))
    older = dict(on_cpu)
    older.pop("autocast")
    check_same_run(workdir, older, on_gpu)
