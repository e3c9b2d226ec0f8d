"""Padded and packed layouts, and deterministic batching and sharding."""

import pytest
import torch

from dpokit.data import (
    TokenizedPair,
    collate_packed,
    collate_padded,
    collate_shared,
    epoch_batches,
    shard_for_rank,
)
from dpokit.errors import DpokitError

PAIRS = [
    TokenizedPair([1, 10, 11], [20, 21], [30], weight=2.0),
    TokenizedPair([1, 12], [22], [31, 32, 33], margin=0.5),
]


def test_padded_right_by_hand():
    batch = collate_padded(PAIRS, pad_token_id=0)
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 21],   # chosen 0
        [1, 12, 22, 0, 0],     # chosen 1
        [1, 10, 11, 30, 0],    # rejected 0
        [1, 12, 31, 32, 33],   # rejected 1
    ]
    assert batch.completion_mask.long().tolist() == [
        [0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.sequence_ids[1].tolist() == [1, 1, 1, -1, -1]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 0, 0]
    assert batch.weights.tolist() == [2.0, 1.0] and batch.margins.tolist() == [0.0, 0.5]
    assert batch.num_pairs == 2 and batch.num_tokens == 5 + 3 + 4 + 5


def test_padded_left_keeps_positions_of_real_tokens():
    batch = collate_padded(PAIRS, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert batch.input_ids.shape == (4, 8)
    assert batch.input_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 12, 22]
    assert batch.position_ids[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2]
    assert batch.completion_mask[1].long().tolist() == [0, 0, 0, 0, 0, 0, 0, 1]


def test_packed_by_hand():
    batch = collate_packed(PAIRS)
    assert batch.attention_mask is None and batch.input_ids.shape == (1, 5 + 3 + 4 + 5)
    assert batch.input_ids[0].tolist() == [1, 10, 11, 20, 21, 1, 12, 22, 1, 10, 11, 30,
                                           1, 12, 31, 32, 33]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert batch.sequence_ids[0].tolist() == [0] * 5 + [1] * 3 + [2] * 4 + [3] * 5
    assert batch.completion_mask[0].long().tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1,
                                                        0, 0, 1, 1, 1]
    assert batch.weights.tolist() == [2.0, 1.0]


def test_no_weight_column_gives_none():
    batch = collate_padded([TokenizedPair([1], [2], [3])], pad_token_id=0)
    assert batch.weights is None and batch.margins is None


def test_epoch_batches_are_a_seeded_permutation():
    first = epoch_batches(10, 4, seed=3, epoch=0)
    assert first == epoch_batches(10, 4, seed=3, epoch=0)  # deterministic
    assert sorted(i for b in first for i in b) == list(range(10))
    assert [len(b) for b in first] == [4, 4, 2]
    assert first != epoch_batches(10, 4, seed=3, epoch=1)  # reshuffled per epoch
    assert first != epoch_batches(10, 4, seed=4, epoch=0)
    assert epoch_batches(10, 4, seed=0, epoch=0, shuffle=False)[0] == [0, 1, 2, 3]
    assert [len(b) for b in epoch_batches(10, 4, seed=0, epoch=0, drop_last=True)] == [4, 4]
    with pytest.raises(DpokitError):
        epoch_batches(10, 0, seed=0, epoch=0)


@pytest.mark.parametrize(("size", "world"), [(8, 2), (7, 2), (5, 3), (2, 4)])
def test_shards_partition_the_global_batch(size, world):
    batch = list(range(100, 100 + size))
    shards = [shard_for_rank(batch, r, world) for r in range(world)]
    assert [i for shard in shards for i in shard] == batch
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_to_moves_every_tensor():
    batch = collate_packed(PAIRS)
    batch.extras["ref_chosen_logps"] = torch.zeros(2)
    moved = batch.to("cpu")
    assert moved.extras["ref_chosen_logps"].device.type == "cpu"
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_shared_prompt_layout_by_hand():
    """Pair 0: prompt [1,10,11], chosen [20,21], rejected [30] → one row of 6 tokens."""
    batch = collate_shared(PAIRS, pad_token_id=0)
    assert batch.input_ids[0].tolist() == [1, 10, 11, 20, 21, 30]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]  # rejected restarts after x
    assert batch.sequence_ids[0].tolist() == [0, 0, 0, 0, 0, 2]
    assert batch.predictor[0].tolist() == [-1, -1, -1, 2, 3, 2]  # y_l[0] predicted from x's end
    assert batch.attention_mask is None and batch.parts == ((3, 2, 1), (2, 1, 3))
    mask = batch.dense_mask()[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # y_l sees x, not y_w
    assert mask[4].tolist() == [True, True, True, True, True, False]
    assert batch.input_ids[1].tolist() == [1, 12, 22, 31, 32, 33]
    assert batch.predictor[1].tolist() == [-1, -1, 1, 1, 3, 4]
    assert batch.num_sequences == 4 and batch.weights.tolist() == [2.0, 1.0]
