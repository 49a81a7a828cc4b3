"""Document masks (dense and FlexAttention BlockMask) against masks built by brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_fn.graph.attention import attend
from olmo_fn.graph.masks import document_block_mask, document_causal_mask

import reference as ref


def doc_ids_strategy(max_batch=2, max_seq=70):
    """Non-decreasing consecutive document ids per row (as the data pipeline produces them)."""

    @st.composite
    def build(draw):
        batch = draw(st.integers(1, max_batch))
        seq = draw(st.integers(1, max_seq))
        rows = []
        for _ in range(batch):
            starts = draw(st.lists(st.booleans(), min_size=seq, max_size=seq))
            row, doc = [], 0
            for i, start in enumerate(starts):
                doc += int(start and i > 0)
                row.append(doc)
            rows.append(row)
        return torch.tensor(rows)

    return build()


@given(doc_ids_strategy(max_seq=24))
@settings(max_examples=60, deadline=None)
def test_dense_document_mask_matches_brute_force(doc_ids):
    assert torch.equal(document_causal_mask(doc_ids)[:, 0], ref.allowed(doc_ids))


def block_sets(block_mask):
    """{(b, q_block): (partial kv blocks, full kv blocks)} read back from a BlockMask."""
    out = {}
    n_q = block_mask.kv_num_blocks.shape[-1]
    for b in range(block_mask.kv_num_blocks.shape[0]):
        for qb in range(n_q):
            n_part = int(block_mask.kv_num_blocks[b, 0, qb])
            n_full = int(block_mask.full_kv_num_blocks[b, 0, qb])
            partial = block_mask.kv_indices[b, 0, qb, :n_part].tolist()
            full = block_mask.full_kv_indices[b, 0, qb, :n_full].tolist()
            out[b, qb] = (partial, full)
    return out


@given(doc_ids_strategy(max_seq=70), st.sampled_from([8, 16]))
@settings(max_examples=60, deadline=None)
def test_block_mask_classifies_blocks_like_brute_force(doc_ids, block_size):
    check_block_classification(doc_ids, block_size, window=0)


def check_block_classification(doc_ids, block_size, window):
    """Off the diagonal a key block is listed full iff every pair is allowed, partial iff some are."""
    batch, seq = doc_ids.shape
    allowed = ref.allowed(doc_ids, window)
    sets = block_sets(document_block_mask(doc_ids, block_size=block_size, window=window))
    n_blocks = -(-seq // block_size)
    for b in range(batch):
        for qb in range(n_blocks):
            partial, full = sets[b, qb]
            expected_partial, expected_full = [], []
            for kb in range(n_blocks):
                tile = allowed[
                    b, qb * block_size : (qb + 1) * block_size, kb * block_size : (kb + 1) * block_size
                ]
                if tile.all() and kb != qb:  # diagonal tiles always go through the per-token mask
                    expected_full.append(kb)
                elif tile.any():
                    expected_partial.append(kb)
            assert (partial, full) == (expected_partial, expected_full)


@pytest.mark.parametrize("seq,block_size", [(64, 16), (50, 16), (200, 128)])
def test_flex_attention_with_block_mask_matches_reference(seq, block_size, gen):
    """FlexAttention forward (CPU) with the BlockMask equals naive attention under the brute-force mask."""
    heads, kv_heads, d = 4, 2, 8
    doc_ids = ref.random_doc_ids(2, seq, gen, p_boundary=0.08)
    q = torch.randn(2, heads, seq, d, generator=gen)
    k = torch.randn(2, kv_heads, seq, d, generator=gen)
    v = torch.randn(2, kv_heads, seq, d, generator=gen)
    out = attend(q, k, v, document_block_mask(doc_ids, block_size=block_size))
    torch.testing.assert_close(out.double(), ref.attend(q, k, v, ref.allowed(doc_ids)), atol=1e-5, rtol=1e-4)


@given(doc_ids_strategy(max_seq=24), st.integers(1, 8))
@settings(max_examples=40, deadline=None)
def test_windowed_dense_mask_matches_brute_force(doc_ids, window):
    assert torch.equal(document_causal_mask(doc_ids, window)[:, 0], ref.allowed(doc_ids, window))


@given(doc_ids_strategy(max_seq=70), st.sampled_from([8, 16]), st.integers(1, 40))
@settings(max_examples=60, deadline=None)
def test_windowed_block_mask_classifies_blocks_like_brute_force(doc_ids, block_size, window):
    check_block_classification(doc_ids, block_size, window)


@pytest.mark.parametrize("window", [1, 17, 40])
def test_flex_attention_with_windowed_block_mask_matches_reference(window, gen):
    doc_ids = ref.random_doc_ids(1, 90, gen, p_boundary=0.03)
    q, k, v = (torch.randn(1, 2, 90, 8, generator=gen) for _ in range(3))
    out = attend(q, k, v, document_block_mask(doc_ids, block_size=16, window=window))
    torch.testing.assert_close(
        out.double(), ref.attend(q, k, v, ref.allowed(doc_ids, window)), atol=1e-5, rtol=1e-4
    )


def _slice_allowed(doc_ids, window, q_index, kv_index):
    """The brute-force mask's rows of the queries `q_index` and columns of the keys `kv_index`."""
    return ref.allowed(doc_ids, window)[:, q_index][:, :, kv_index]


@given(doc_ids_strategy(max_seq=24), st.sampled_from([1, 2, 3]), st.integers(0, 6), st.data())
@settings(max_examples=60, deadline=None)
def test_context_parallel_slice_mask_matches_brute_force(doc_ids, cp, window, data):
    """A cp rank's mask (its head-and-tail queries against every rank's keys in gather order) is the
    whole row's mask at those positions."""
    from olmo_fn.parallelize.context_parallel import gathered_positions, slice_positions

    seq = doc_ids.shape[1] - doc_ids.shape[1] % (2 * cp)
    if seq == 0:
        return
    doc_ids = doc_ids[:, :seq]
    rank = data.draw(st.integers(0, cp - 1))
    q, kv = slice_positions(seq, cp, rank), gathered_positions(seq, cp)
    got = document_causal_mask(doc_ids, window, q_index=q, kv_index=kv)[:, 0]
    assert torch.equal(got, _slice_allowed(doc_ids, window, q, kv))


@pytest.mark.parametrize("cp,window", [(2, 0), (2, 37), (4, 0)])
def test_flex_attention_with_a_context_parallel_block_mask_matches_reference(cp, window, gen):
    """FlexAttention forward (CPU) over a cp rank's queries and all keys, with the indexed BlockMask,
    equals naive attention under the brute-force mask at those positions (chunks of 24 tokens: query
    and key blocks of 16 straddle the chunk boundaries)."""
    from olmo_fn.parallelize.context_parallel import gathered_positions, slice_positions

    seq = 48 * cp
    doc_ids = ref.random_doc_ids(2, seq, gen, p_boundary=0.03)
    q_index, kv_index = slice_positions(seq, cp, cp - 1), gathered_positions(seq, cp)
    q = torch.randn(2, 4, seq // cp, 8, generator=gen)
    k, v = (torch.randn(2, 2, seq, 8, generator=gen) for _ in range(2))
    mask = document_block_mask(doc_ids, block_size=16, window=window, q_index=q_index, kv_index=kv_index)
    out = attend(q, k, v, mask)
    allowed = _slice_allowed(doc_ids, window, q_index, kv_index)
    torch.testing.assert_close(out.double(), ref.attend(q, k, v, allowed), atol=1e-5, rtol=1e-4)
