"""Review of the memory plan's inputs (dpokit.memory, dpokit.train.recompute).

Oracles: the bytes the forward pass leaves allocated (the CPU profiler: what backward keeps),
a fake ``/proc`` + ``/sys/fs/cgroup`` tree with hand-computed headrooms, real allocator failures
in child processes under resource limits, and for recomputation the same model without it
(gradients bit-identical on CPU: the same kernels on the same inputs).
"""

import contextlib
import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.fixtures import tiny_causal_lm
from dpokit.memory import host_available_bytes, is_out_of_memory
from dpokit.train.recompute import enable_recompute, freed_bytes, kept_bytes

LINUX = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def _forward_kept(model, ids, autocast):
    """Bytes allocated in the decoder's forward and still allocated at its end."""
    gc.collect()
    context = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
               else contextlib.nullcontext())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, context:
        out = model.model(input_ids=ids).last_hidden_state.float().sum()
    kept = sum(event.self_cpu_memory_usage for event in prof.key_averages())
    out.backward()
    return kept


@pytest.mark.parametrize(("hidden", "inner", "layers"), [(64, 176, 2), (128, 352, 4)])
def test_the_kept_estimate_under_mixed_precision_counts_the_float32_residual(hidden, inner,
                                                                             layers):
    """float32 weights under bfloat16 autocast (``bf16: true`` with the default ``dtype``):
    the residual stream, norms and rotary values stay float32, so the estimate with the
    weights' 4 bytes as ``residual_bytes`` must be within −10%/+25% of the profiler's bytes
    (the tolerance test_recompute.py states for float32). The old estimate, everything at
    2 bytes, was 1.45–1.50× low without recomputation (old code: no ``residual_bytes``)."""
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(2))
    for mode in ("none", "selective"):
        model = tiny_causal_lm("llama", vocab_size=128, hidden_size=hidden, num_layers=layers,
                               intermediate_size=inner, seed=1, dtype=torch.float32)
        enable_recompute(model, mode)
        model.train()
        kept = _forward_kept(model, ids, autocast=True)
        estimate = kept_bytes(model.config, ids.numel(), 2, mode, residual_bytes=4)
        assert 0.9 * estimate < kept < 1.25 * estimate, (mode, kept / estimate)


def test_residual_bytes_by_hand_and_unchanged_without_it():
    """H = 512, I = 1408, 8 layers, 1,000 tokens, compute 2 bytes, weights 4:
    none 8 · (9·512·4 + 4·1408·2), selective 8 · (5·512·2 + 512·4 + 2·1408·2),
    full 8·512·4 + 9·512·4 + 4·1408·2; without ``residual_bytes`` the old a·H + b·I values."""
    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1408,
                                  num_hidden_layers=8, num_attention_heads=8)
    assert kept_bytes(config, 1000, 2, "none", residual_bytes=4) == 1000 * 8 * (18_432 + 11_264)
    assert kept_bytes(config, 1000, 2, "selective", residual_bytes=4) == 1000 * 8 * (
        5_120 + 2_048 + 5_632)
    assert kept_bytes(config, 1000, 2, "full", residual_bytes=4) == 1000 * (
        16_384 + 18_432 + 11_264)
    assert freed_bytes(config, 1000, 2, residual_bytes=4) == 1000 * 8 * (29_696 - 12_800)
    for mode, values in (("none", 9 * 512 + 4 * 1408), ("selective", 6 * 512 + 2 * 1408)):
        assert kept_bytes(config, 1000, 2, mode) == 1000 * 8 * values * 2


def fake_root(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_cgroup_v2_memory_high_binds(tmp_path):
    """systemd's MemoryHigh / Kubernetes' memory QoS: past ``memory.high`` the kernel throttles
    and reclaims the cgroup — 6 GB high, 2 GB used → 4 GB, below memory.max's 8 GB headroom
    and the host's 20 GB (old code: 8 GB, memory.high unread)."""
    root = fake_root(tmp_path, {
        "proc/meminfo": "MemAvailable:   20000000 kB\n",
        "proc/self/cgroup": "0::/job\n",
        "sys/fs/cgroup/job/memory.max": "10000000000\n",
        "sys/fs/cgroup/job/memory.high": "6000000000\n",
        "sys/fs/cgroup/job/memory.current": "2000000000\n",
    })
    assert host_available_bytes(root) == 4_000_000_000
    (root / "sys/fs/cgroup/job/memory.high").write_text("max\n")  # no throttle: memory.max
    assert host_available_bytes(root) == 8_000_000_000


def _child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


@LINUX
def test_the_data_segment_limit_counts_and_its_failure_is_recognised():
    """``ulimit -d`` (RLIMIT_DATA) caps what PyTorch's CPU allocator can map: the headroom is
    at most the 256 MiB left under it (old code: the host's memory, GBs), and allocating past
    it fails with an error is_out_of_memory recognises."""
    out = _child(
        "import resource, torch\n"
        "from dpokit.memory import available_bytes, is_out_of_memory\n"
        "data = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
        "if l.startswith('VmData'))\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (data + (256 << 20), resource.RLIM_INFINITY))\n"
        "print(available_bytes(torch.device('cpu')))\n"
        "try:\n    torch.empty(1 << 30, dtype=torch.uint8)\n"
        "except BaseException as error:\n    print(is_out_of_memory(error))\n")
    available, recognised = out.splitlines()
    assert 0 < int(available) <= 256 << 20
    assert recognised == "True"


def test_unrelated_runtime_errors_are_not_out_of_memory():
    """Errors that retrying smaller would not cure stay what they are."""
    for message in ("Expected all tensors to be on the same device, but found at least two "
                    "devices, cpu and cuda:0!",
                    "CUDA error: an illegal memory access was encountered",
                    "DataLoader worker (pid 7) is killed by signal: Bus error. It is possible "
                    "that dataloader's workers are out of shared memory.",
                    "index 5 is out of bounds for dimension 0 with size 3",
                    "CUDA error: device-side assert triggered"):
        assert not is_out_of_memory(RuntimeError(message)), message
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    with pytest.raises(RuntimeError) as caught:  # the real message of a CPU allocation
        torch.empty(1 << 62, dtype=torch.uint8)
    assert is_out_of_memory(caught.value), str(caught.value)


FAMILIES = {
    "qwen2": dict(attention_dropout=0.1),  # attention dropout drawn inside SDPA
    "gpt2": None,  # residual, attention and embedding dropout; Conv1D (addmm)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # routed experts
    "gpt_neox": dict(hidden_dropout=0.1, attention_dropout=0.1),  # partial rotary
}


def _family(kind):
    if FAMILIES[kind] is None:
        config = AutoConfig.for_model("gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64, bos_token_id=1, eos_token_id=2)
    else:
        config = AutoConfig.for_model(kind, vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      **FAMILIES[kind])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_selective_recomputation_keeps_every_gradient_with_dropout_on(kind):
    """Training mode, dropout on, the same seed: the loss and every gradient of selective (and
    full) recomputation equal those without it, exactly (the policy's saved ops are served
    from the cache, the rest recomputed under the replayed RNG)."""
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", "selective", "full"):
        model = _family(kind)
        enable_recompute(model, mode)
        model.train()
        torch.manual_seed(123)
        loss = model(input_ids=ids).logits.log_softmax(-1).mean()
        loss.backward()
        results[mode] = (loss.detach(), [p.grad for p in model.parameters()])
    for mode in ("selective", "full"):
        torch.testing.assert_close(results[mode][0], results["none"][0], rtol=0, atol=0)
        for plain, recomputed in zip(results["none"][1], results[mode][1], strict=True):
            assert (plain is None) == (recomputed is None)
            if plain is not None:
                torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def _opt():
    """A tiny OPT: a family outside LAYOUT_MODEL_TYPES (it counts positions from the mask),
    whose packed and shared batches run padded."""
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=128,
                                    word_embed_proj_dim=32)).eval()


class _Layout:
    def __init__(self, layout, unpadded):
        self.layout, self.unpadded = layout, unpadded


@pytest.mark.parametrize("family, layout, unpadded, expected", [
    ("llama", "shared", True, ("shared", True)),
    ("llama", "shared", False, ("shared", False)),
    ("llama", "padded", True, ("padded", True)),
    ("opt", "shared", True, ("padded", False)),
    ("opt", "packed", False, ("padded", False)),
])
def test_the_plan_sees_the_layout_the_batches_run_in(family, layout, unpadded, expected):
    """The memory plan counted the layout the config asked for: a shared batch of a family
    completion_logps lays out padded (OPT) was counted as shared rows, and ``unpadded`` as
    real tokens only for families segment attention does not switch."""
    from dpokit.data import TokenizedPair, collate_pairs
    from dpokit.logps import completion_logps
    from dpokit.train.setup import run_layout

    model = _opt() if family == "opt" else tiny_causal_lm("llama", vocab_size=64)
    assert run_layout(_Layout(layout, unpadded), model) == expected
    # the oracle: the batch completion_logps actually runs (its input rows, padded or flat)
    seen = {}

    def spy(module, args, kwargs):
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)

    decoder = model.get_decoder()
    handle = decoder.register_forward_pre_hook(spy, with_kwargs=True)
    pairs = [TokenizedPair([1, 2, 3], [4], [5, 6, 7, 8, 9]), TokenizedPair([1], [4, 5], [6])]
    try:
        with torch.no_grad():
            completion_logps(model, collate_pairs(pairs, layout, pad_token_id=0),
                             unpadded=unpadded)
    finally:
        handle.remove()
    runs_flat = seen["ids"].shape[0] == 1 and seen["ids"].numel() == sum(
        (1 if layout == "shared" else 2) * len(p.prompt_ids) + len(p.chosen_ids)
        + len(p.rejected_ids) for p in pairs)
    rows = seen["ids"].shape[0]
    assert runs_flat == expected[1]
    if not expected[1]:
        assert rows == {"padded": 4, "shared": 2, "packed": 1}[expected[0]]


def test_padded_pairs_are_counted_as_their_two_padded_rows():
    """A padded pair is two rows, prompt + chosen and prompt + rejected, both as long as the
    longer: 2·(p + max(c, r)) tokens, not 2p + c + r (1.8× low at p = 10, c = 1, r = 100);
    from the store's lengths as from a list, equal to the collated batch's size."""
    from dpokit.data import TokenizedPair, collate_pairs
    from dpokit.data.store import StoreWriter, chunk_arrays
    from dpokit.train.setup import padded_pair_rows

    pairs = [TokenizedPair(list(range(10)), [1], list(range(100))),
             TokenizedPair([3, 4], [5, 6, 7], [8])]
    rows = padded_pair_rows(pairs)
    assert rows.tolist() == [220, 10]
    for pair, tokens in zip(pairs, rows, strict=True):
        assert collate_pairs([pair], "padded", pad_token_id=0).input_ids.numel() == tokens
    writer = StoreWriter(TokenizedPair, None)
    writer.append(chunk_arrays(pairs, TokenizedPair))
    assert padded_pair_rows(writer.finish()).tolist() == [220, 10]
