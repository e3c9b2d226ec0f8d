"""The GPU path of the unpadded decoder, one FlexAttention call per layer (dpokit.attention_flex),
checked on this CPU where FlexAttention runs: forward only (it has no CPU backward), eager.

Oracles: transformers' own padded pass (float64, log-prob sums within 1e-10), a mask written
out token by token from the segments' parts, and ``create_block_mask``'s block mask.
"""

import copy
import itertools

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode

import dpokit.attention_flex as attention_flex
from dpokit.attention import Segments
from dpokit.logps import completion_logps
from dpokit.train.recompute import selective_context
from tests.helpers import LAYOUTS, count_calls, tokenized_pairs
from tests.test_attention import ROWS, tiny_of_type


def segments_of(lengths_and_parts, positions=None):
    """Segments from ``[(parts...), ...]`` laid end to end, positions restarting per sequence
    (a later completion's positions continue its prompt's, as in a shared-prompt row)."""
    bounds, stop, pos = [], 0, []
    for parts in lengths_and_parts:
        n = sum(parts)
        bounds.append((stop, stop + n))
        stop += n
        pos += list(range(parts[0] + (parts[1] if len(parts) > 1 else 0)))
        for m in parts[2:]:
            pos += list(range(parts[0], parts[0] + m))
    return Segments(tuple(bounds), tuple(tuple(p) for p in lengths_and_parts),
                    torch.tensor(pos) if positions is None else positions)


def mask_by_hand(segments, window):
    """The allowed (query, key) pairs written out from the definition: same segment, key not
    after the query, key in the query's own part or in the prompt, within the window."""
    total = segments.bounds[-1][1]
    mask = torch.zeros(total, total, dtype=torch.bool)
    pos = segments.position_ids.tolist()
    for (start, _stop), parts in zip(segments.bounds, segments.parts, strict=True):
        labels = [j for j, n in enumerate(parts) for _ in range(n)]
        for a, b in itertools.product(range(len(labels)), repeat=2):
            if b <= a and labels[b] in (0, labels[a]) and (
                    window is None or pos[start + a] - pos[start + b] < window):
                mask[start + a, start + b] = True
    return mask


SEGMENTS = [(90,), (41, 54, 60), (7,), (130, 20, 3), (200,), (12, 1, 1, 9), (64,)]


@pytest.mark.parametrize("window", [None, 50])
def test_mask_mod_is_the_segments_pattern(window):
    segments = segments_of(SEGMENTS)
    segment, part = attention_flex.token_labels(segments)
    mod = attention_flex.segment_mask_mod(segment, part, segments.position_ids, window)
    total = segments.bounds[-1][1]
    dense = create_mask(mod, 1, 1, total, total, device="cpu")[0, 0]
    assert torch.equal(dense, mask_by_hand(segments, window))


@pytest.mark.parametrize("window", [None, 50])
def test_segment_block_mask_equals_create_block_mask(window, monkeypatch):
    """Built chunk by chunk (forced to several chunks here), the block mask equals
    ``create_block_mask``'s — the same partial and full blocks — and skips most blocks."""
    monkeypatch.setattr(attention_flex, "CHUNK_ELEMENTS", 3 * 128 * 128)
    segments = segments_of(SEGMENTS)
    segment, part = attention_flex.token_labels(segments)
    mod = attention_flex.segment_mask_mod(segment, part, segments.position_ids, window)
    total = segments.bounds[-1][1]
    ours = attention_flex.segment_block_mask(segments, window)
    theirs = create_block_mask(mod, 1, 1, total, total, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.sparsity() > 40  # percent of blocks skipped: 7 segments over 7 blocks


@pytest.mark.parametrize("model_type,window", [("llama", None), ("qwen2", None), ("qwen2", 3),
                                               ("gpt2", None)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_forward_equals_padded(tokenizer, model_type, window, layout, monkeypatch):
    """Every layout's log-probs with the whole flattened row as one FlexAttention call per layer
    (GQA for llama/qwen2, a sliding window of 3) equal transformers' right-padded pass
    (float64)."""
    import dpokit.attention as attention

    monkeypatch.setattr(attention_flex, "use_flex", lambda device, head_dim, dtype: True)
    calls = count_calls(monkeypatch, attention_flex, "flex_segment_attention")
    sdpa = []
    monkeypatch.setattr(attention, "_sdpa", lambda *a, **k: sdpa.append(1))
    model, tolerance = tiny_of_type(model_type, len(tokenizer), window=window)
    padded = copy.deepcopy(model)
    pairs = tokenized_pairs(ROWS, tokenizer)
    with torch.no_grad():  # the oracle: right-padded (a window counts each sequence's positions)
        expected = completion_logps(padded, LAYOUTS["right"](pairs), chunk_size=8,
                                    unpadded=False).logps
        got = completion_logps(model, LAYOUTS[layout](pairs), chunk_size=8, unpadded=True).logps
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    assert len(calls) == model.config.num_hidden_layers and not sdpa


def test_flex_only_where_its_cuda_kernel_runs():
    """One FlexAttention call on CUDA for heads of ≥ 16 dimensions (``tl.dot``'s minimum; PyTorch
    raises below it, checked on a GPU by tests/test_gpu.py) in float32/bf16/fp16; the
    per-segment calls everywhere else."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_flex.use_flex(cuda, 64, torch.bfloat16)
    assert attention_flex.use_flex(cuda, 16, torch.float32)
    assert attention_flex.use_flex(cuda, 80, torch.float16)  # not a power of 2: rounded inside
    assert not attention_flex.use_flex(cuda, 8, torch.float32)
    assert not attention_flex.use_flex(cuda, 64, torch.float64)
    assert not attention_flex.use_flex(cpu, 64, torch.float32)


class _Plain(TorchDispatchMode):
    """A dispatch mode torch.compile does not see through (as selective checkpointing's were
    before PyTorch declared them ``ignore_compile_internals``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _SeenThrough(_Plain):
    @classmethod
    def ignore_compile_internals(cls):
        return True


def test_compiles_here_sees_the_dispatch_modes():
    assert attention_flex.compiles_here()
    with _SeenThrough():
        assert attention_flex.compiles_here()
    with _Plain():
        assert not attention_flex.compiles_here()
    forward, _recompute = selective_context()  # this PyTorch's selective checkpointing
    with forward:
        assert attention_flex.compiles_here() == type(forward).ignore_compile_internals()


def test_under_a_mode_compile_skips_the_segments_take_the_per_segment_calls(tokenizer,
                                                                            monkeypatch):
    """Where Dynamo would skip the compiled kernel (eager FlexAttention: dense T × T scores on a
    GPU), the segments run as per-segment calls instead — equal to the padded pass."""
    monkeypatch.setattr(attention_flex, "use_flex", lambda device, head_dim, dtype: True)
    calls = count_calls(monkeypatch, attention_flex, "flex_segment_attention")
    model, tolerance = tiny_of_type("llama", len(tokenizer))
    padded = copy.deepcopy(model)
    pairs = tokenized_pairs(ROWS, tokenizer)
    with torch.no_grad():
        expected = completion_logps(padded, LAYOUTS["right"](pairs), chunk_size=8,
                                    unpadded=False).logps
        with _Plain():
            got = completion_logps(model, LAYOUTS["shared"](pairs), chunk_size=8,
                                   unpadded=True).logps
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    assert not calls
