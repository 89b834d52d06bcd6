"""ZeroSpreadSampler: even spread of zero items, epochs, DDP partition, exact resume."""

import math

import pytest

from dmmi.data.samplers import ZeroSpreadSampler, spread_evenly
from dmmi.errors import DmmiError


def make_types(n_other, n_zero):
    """Zero items clustered at the end (the worst case for a sampler that does not spread)."""
    return ["one" if i % 3 else "many" for i in range(n_other)] + ["zero"] * n_zero


def gaps(order, types):
    """Lengths of the runs of non-zero items before, between and after the zero items."""
    runs, run = [], 0
    for i in order:
        if types[i] == "zero":
            runs.append(run)
            run = 0
        else:
            run += 1
    return runs + [run]


@pytest.mark.parametrize("n_other,n_zero", [(50, 7), (30, 10), (10, 1), (5, 12), (100, 33)])
def test_zero_items_evenly_spread(n_other, n_zero):
    types = make_types(n_other, n_zero)
    sampler = ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(types)))
    bound = math.ceil(n_other / n_zero)
    assert max(gaps(order, types)) <= bound
    # and symmetric: no long run of zeros either
    inverse = ["zero" if t != "zero" else "one" for t in types]
    assert max(gaps(order, inverse)) <= math.ceil(n_zero / n_other)


def test_spread_evenly_keeps_group_order():
    assert spread_evenly([1, 2, 3, 4, 5, 6], ["a", "b"]) == [1, 2, "a", 3, 4, 5, "b", 6]
    assert spread_evenly([1, 2], []) == [1, 2] and spread_evenly([], ["a"]) == ["a"]


def test_each_epoch_differs_and_is_reproducible():
    types = make_types(40, 10)
    sampler = ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=0)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert len({tuple(o) for o in orders}) == 3
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]
    assert list(ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=1)) != orders[0]


def test_no_zero_items_is_a_plain_shuffle():
    types = ["one"] * 30
    sampler = ZeroSpreadSampler(types, num_replicas=1, rank=0)
    order = list(sampler)
    assert sorted(order) == list(range(30)) and order != list(range(30))


def test_no_shuffle_interleaves_in_index_order():
    types = ["zero", "one", "one", "zero", "one", "one", "one", "one"]
    order = list(ZeroSpreadSampler(types, num_replicas=1, rank=0, shuffle=False))
    assert order == [1, 2, 0, 4, 5, 6, 3, 7]


def test_ranks_partition_the_indices_with_padding():
    types = make_types(14, 6)  # 20 items on 3 ranks: 7 each, one repeated
    per_rank = [list(ZeroSpreadSampler(types, num_replicas=3, rank=r, seed=5)) for r in range(3)]
    assert [len(p) for p in per_rank] == [7, 7, 7]
    assert [len(ZeroSpreadSampler(types, num_replicas=3, rank=r)) for r in range(3)] == [7, 7, 7]
    flat = [i for p in per_rank for i in p]
    assert set(flat) == set(range(20)) and len(flat) - len(set(flat)) == 1
    full = list(ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=5))
    assert flat == full + full[:1]  # padding repeats the start of the order


def test_drop_last_ranks_are_disjoint():
    types = make_types(14, 6)
    per_rank = [set(ZeroSpreadSampler(types, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(p) for p in per_rank] == [6, 6, 6]
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2]) and not (per_rank[0] & per_rank[2])


def test_every_rank_gets_its_share_of_zero_items():
    # 30 others + 10 zeros: a zero every 4th position; a strided split over 4 ranks would
    # hand all zeros to one rank
    types = make_types(30, 10)
    for epoch in range(3):
        counts = []
        for r in range(4):
            s = ZeroSpreadSampler(types, num_replicas=4, rank=r, seed=0)
            s.set_epoch(epoch)
            order = list(s)
            counts.append(sum(types[i] == "zero" for i in order))
            assert max(gaps(order, types)) <= 3 + 1
        assert min(counts) >= 2 and max(counts) <= 3


def test_state_dict_resume_reproduces_the_order():
    types = make_types(25, 8)
    sampler = ZeroSpreadSampler(types, num_replicas=2, rank=1, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    consumed = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 5 and consumed == full[:5]

    resumed = ZeroSpreadSampler(types, num_replicas=2, rank=1, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's usual call keeps the position
    assert len(resumed) == len(full) - 5
    assert list(resumed) == full[5:]
    assert list(resumed) == full  # the next pass over the same epoch is whole again
    resumed.set_epoch(3)
    sampler.set_epoch(3)
    assert list(resumed) == list(sampler)


def test_state_dict_with_explicit_position():
    types = make_types(20, 5)
    sampler = ZeroSpreadSampler(types, num_replicas=1, rank=0)
    full = list(sampler)
    state = sampler.state_dict(position=8)  # e.g. 2 steps of batch 4, whatever was prefetched
    other = ZeroSpreadSampler(types, num_replicas=1, rank=0)
    other.load_state_dict(state)
    assert list(other) == full[8:]


def test_state_dict_mismatch_is_refused():
    state = ZeroSpreadSampler(make_types(20, 5), num_replicas=1, rank=0).state_dict()
    with pytest.raises(DmmiError, match="num_items=25, this run has 26"):
        ZeroSpreadSampler(make_types(21, 5), num_replicas=1, rank=0).load_state_dict(state)
    with pytest.raises(DmmiError, match="num_replicas"):
        ZeroSpreadSampler(make_types(20, 5), num_replicas=2, rank=0).load_state_dict(state)


def test_with_epoch_yields_pairs():
    sampler = ZeroSpreadSampler(make_types(6, 2), num_replicas=1, rank=0, with_epoch=True)
    sampler.set_epoch(4)
    pairs = list(sampler)
    assert all(e == 4 for _, e in pairs) and sorted(i for i, _ in pairs) == list(range(8))


def test_bad_rank():
    with pytest.raises(DmmiError, match="rank 2"):
        ZeroSpreadSampler(["one"], num_replicas=2, rank=2)


def test_global_batches_are_the_same_on_any_number_of_ranks():
    """batch_size + global_batch: step b trains on order[b*G:(b+1)*G] whether 1 rank takes 4, 2 ranks
    take 2 each, or 2 ranks take 1 in each of 2 micro-steps; the tail that fills no global batch is
    left out on every rank."""
    types = ["zero" if i % 5 == 0 else "one" for i in range(23)]
    one = list(ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=3, batch_size=4))
    assert len(one) == 20
    two = [list(ZeroSpreadSampler(types, num_replicas=2, rank=r, seed=3, batch_size=2)) for r in range(2)]
    accum = [list(ZeroSpreadSampler(types, num_replicas=2, rank=r, seed=3, batch_size=1, global_batch=4))
             for r in range(2)]
    for b in range(5):
        step = set(one[4 * b:4 * b + 4])
        assert set(two[0][2 * b:2 * b + 2]) | set(two[1][2 * b:2 * b + 2]) == step
        assert set(accum[0][2 * b:2 * b + 2]) | set(accum[1][2 * b:2 * b + 2]) == step
    with pytest.raises(DmmiError, match="global batch 6 is not a multiple of 2 per rank x 2 ranks"):
        ZeroSpreadSampler(types, num_replicas=2, rank=0, batch_size=2, global_batch=6)


def test_batch_blocks_resume_on_another_rank_count():
    """Positions of batch blocks do not depend on the rank count: a state saved by one layout loads in another."""
    types = ["one"] * 16
    s = ZeroSpreadSampler(types, num_replicas=2, rank=0, seed=1, batch_size=2)
    state = s.state_dict(position=4)
    t = ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=1, batch_size=4)
    t.load_state_dict(dict(state, position=8))
    assert list(t) == list(ZeroSpreadSampler(types, num_replicas=1, rank=0, seed=1, batch_size=4))[8:]
