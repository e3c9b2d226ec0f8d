"""The GPU paths, checked on a CUDA device against CPU oracles (skipped where there is none).

CI has no GPU, so these run only on a machine with one (``benchmarks/gpu_check.sh`` runs them
with the GPU benchmark). Each compares the CUDA result with an independent CPU computation:

- log-probs and every parameter's gradient of the unpadded decoder — one FlexAttention call per
  layer on a GPU (:mod:`dpokit.attention_flex`), or SDPA per segment for heads below 16
  dimensions — against transformers' right-padded pass in float64 on the CPU, every layout ×
  llama (GQA) / qwen2 with a 3-token window / gpt2;
- a row's log-probs alone and beside longer rows (the block mask shifts with the row's offset);
- the available memory and the out-of-memory error as dpokit.memory reads them;
- three float32 training steps on the GPU against the same steps on the CPU (losses, gradient
  norms), and bf16 autocast against float32.

Tolerances are float32's with TF32 switched off (``torch.backends.cuda.matmul.allow_tf32 =
False``, the default "highest" float32 matmul precision): log-prob sums within 1e-4 absolute
(sums of ≤ 12 tokens of magnitude ≤ 10, float32's rounding ~1e-6 each), gradients within 1e-4
of their norm — a segment seeing another's keys, a dropped block or a wrong window changes them
by orders of magnitude more.
"""

import copy
import math

import pytest
import torch

import dpokit.attention_flex as attention_flex
from dpokit.logps import completion_logps
from dpokit.train.loop import train
from tests.helpers import LAYOUTS, count_calls, read_metrics, tokenized_pairs
from tests.test_attention import ROWS, tiny_of_type
from tests.train.test_trainer import config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 means float32 here: TF32 matmuls (10-bit mantissa) would hide nothing but fail
    the float32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _weighted_sum(logps):
    """A scalar every sequence's log-prob enters with its own weight, so each one's gradient
    is checked (a plain sum could hide two errors that cancel)."""
    weights = torch.linspace(0.5, 1.5, logps.numel(), dtype=logps.dtype, device=logps.device)
    return (logps * weights).sum()


def _grads(model):
    return {name: p.grad.detach().double().cpu() for name, p in model.named_parameters()
            if p.grad is not None}


def _check_against_the_cpu_padded_pass(tokenizer, model_type, window, layout, hidden,
                                       monkeypatch):
    """Log-probs and gradients of a float32 CUDA copy of a float64 CPU model, unpadded, against
    the CPU model's right-padded pass; returns how many FlexAttention calls it made."""
    oracle, _ = tiny_of_type(model_type, len(tokenizer), window=window, hidden=hidden)
    model = copy.deepcopy(oracle).float().cuda()
    pairs = tokenized_pairs(ROWS, tokenizer)
    calls = count_calls(monkeypatch, attention_flex, "flex_segment_attention")
    expected = completion_logps(oracle, LAYOUTS["right"](pairs), chunk_size=8,
                                unpadded=False).logps
    _weighted_sum(expected).backward()
    got = completion_logps(model, LAYOUTS[layout](pairs).to("cuda"), chunk_size=8,
                           unpadded=True).logps
    _weighted_sum(got).backward()
    torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=0, atol=1e-4)
    ours, theirs = _grads(model), _grads(oracle)
    assert ours.keys() == theirs.keys()
    for name, g in theirs.items():
        error = float((ours[name] - g).norm())
        assert error <= 1e-4 * float(g.norm()) + 1e-7, (name, error, float(g.norm()))
    return len(calls)


@pytest.mark.parametrize("model_type,window", [("llama", None), ("qwen2", 3), ("gpt2", None)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_flex_logps_and_gradients_equal_the_cpu_padded_pass(tokenizer, model_type, window,
                                                                 layout, monkeypatch):
    """Heads of 16 dimensions: one FlexAttention call per layer (the GPU path, not a
    fallback), forward and backward equal to the CPU float64 padded pass."""
    calls = _check_against_the_cpu_padded_pass(tokenizer, model_type, window, layout, 64,
                                               monkeypatch)
    assert calls == 2  # layers


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_cuda_small_heads_take_the_per_segment_calls(tokenizer, layout, monkeypatch):
    """Heads of 8 dimensions (below FlexAttention's CUDA minimum): SDPA per segment on the
    GPU, equally exact."""
    calls = _check_against_the_cpu_padded_pass(tokenizer, "llama", None, layout, 32,
                                               monkeypatch)
    assert calls == 0


def test_cuda_flex_kernel_refuses_heads_below_16():
    """Why :data:`~dpokit.attention_flex.MIN_HEAD_DIM` is 16: PyTorch's compiled CUDA kernel
    raises below it (if a PyTorch lifts that, this fails and the rule can go)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.randn(1, 2, 128, 8, device="cuda")
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, 1, 1, 128, 128,
                             device="cuda")
    with pytest.raises(Exception, match="at least 16"):
        torch.compile(flex_attention)(q, q, q, block_mask=mask)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_cuda_row_log_probs_barely_depend_on_the_batch(tokenizer, layout):
    """The first row alone and beside longer rows: on a GPU the block mask's 128-token blocks
    fall elsewhere in the flattened row, so the sums may differ in float32 rounding — but only
    there (1e-5 here), never by what a mask error would cost."""
    model, _ = tiny_of_type("llama", len(tokenizer), hidden=64)
    model = model.float().cuda()
    long_rows = [{"prompt": "the cat sat " * 40, "chosen": " on the mat." * 5,
                  "rejected": " under the green tree!" * 4}] * 2
    alone = tokenized_pairs(ROWS[:1], tokenizer)
    beside = tokenized_pairs(long_rows + ROWS[:1], tokenizer)
    with torch.no_grad():
        one = completion_logps(model, LAYOUTS[layout](alone).to("cuda"), chunk_size=8).logps
        many = completion_logps(model, LAYOUTS[layout](beside).to("cuda"), chunk_size=8).logps
    pairs_beside = len(beside)
    picked = many[[2, 2 + pairs_beside]]  # row 3's chosen and rejected
    torch.testing.assert_close(picked.cpu(), one.cpu(), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def llama16(workdir, tokenizer):
    """A saved tiny Llama with heads of 16 dimensions (the workdir's have 8, which FlexAttention
    does not take), so the training steps run the FlexAttention path."""
    from dpokit.fixtures import tiny_causal_lm

    path = workdir / "llama-head16"
    if not path.exists():
        tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64,
                       seed=7).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _config(workdir, model, out, **overrides):
    """The trainer tests' configuration (tests/train/test_trainer.py), 3 steps of ``model``."""
    return config(workdir, out, model=str(model), max_steps=3, **overrides)


@pytest.mark.parametrize("recompute", [{}, {"selective_checkpointing": True},
                                       {"gradient_checkpointing": True}],
                         ids=["keep", "selective", "full"])
def test_cuda_training_steps_equal_the_cpu_steps(workdir, llama16, recompute):
    """Three float32 DPO steps (shared-prompt layout, precomputed reference, AdamW — fused on the
    GPU) on the GPU and on the CPU: the same losses and gradient norms within float32
    rounding — also with the layers recomputed, where FlexAttention runs inside PyTorch's
    (selective) activation checkpointing (or, under selective checkpointing on a PyTorch whose
    modes torch.compile cannot see through, the per-segment calls take over)."""
    name = "-".join(recompute) or "keep"
    cpu = read_metrics(train(_config(workdir, llama16, f"gpu-vs-cpu-cpu-{name}", device="cpu",
                                     **recompute), progress=False).parent)
    gpu = read_metrics(train(_config(workdir, llama16, f"gpu-vs-cpu-cuda-{name}",
                                     device="cuda", **recompute), progress=False).parent)
    assert len(cpu) == len(gpu) == 3
    for c, g in zip(cpu, gpu, strict=True):
        assert g["loss"] == pytest.approx(c["loss"], rel=1e-4, abs=1e-5)
        assert g["grad_norm"] == pytest.approx(c["grad_norm"], rel=1e-3)


def test_cuda_bf16_autocast_trains_close_to_float32(workdir, llama16):
    fp32 = read_metrics(train(_config(workdir, llama16, "gpu-fp32", device="cuda"),
                              progress=False).parent)
    bf16 = read_metrics(train(_config(workdir, llama16, "gpu-bf16", device="cuda", bf16=True),
                              progress=False).parent)
    assert all(math.isfinite(m["loss"]) for m in bf16)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.05)
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_cuda_available_memory_and_its_out_of_memory_error():
    """dpokit.memory on a real GPU: the available bytes are at most the device's total and fall
    by what we allocate (within 64 MiB: other processes, allocator rounding); an allocation of
    twice the device's memory raises an error is_out_of_memory recognises, whose message says
    how much it asked for (the trainer's one-line error reads it)."""
    from dpokit.memory import available_bytes, is_out_of_memory, requested_bytes

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    before = available_bytes(device)
    assert 0 < before <= total
    block = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    assert abs((before - available_bytes(device)) - (1 << 30)) < 64 << 20
    del block
    with pytest.raises(Exception) as error:  # the type is what is checked next
        torch.empty(2 * total, dtype=torch.uint8, device=device)
    assert is_out_of_memory(error.value), repr(error.value)
    asked = requested_bytes(error.value)
    assert asked is not None and abs(asked - 2 * total) < 0.01 * total, str(error.value)[:300]
