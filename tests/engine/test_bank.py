import pytest
import torch

from fgvce_lightning.engine.bank import ReferenceBank

SHAPE = (4, 3, 3)


def _maps(values):
    """One constant feature map per value, so slots are easy to read back."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, *SHAPE).clone()


def _ids(values):
    return torch.tensor(values)[:, None].repeat(1, 3)


def test_add_and_get_per_class():
    bank = ReferenceBank(3, 4, SHAPE)
    assert bank.add(_maps([1, 2, 3]), torch.tensor([0, 2, 0]), _ids([10, 20, 30])) == 0
    assert bank.counts().tolist() == [2, 0, 1]
    feats, ids = bank.get(0)
    assert feats[:, 0, 0, 0].tolist() == [1, 3]
    assert ids[:, 0].tolist() == [10, 30]
    feats, ids = bank.get(1)
    assert feats.shape == (0, *SHAPE) and ids.shape == (0, 3)
    assert len(bank) == 3


def test_ring_buffer_overwrites_oldest():
    bank = ReferenceBank(2, 3, SHAPE)
    for v in range(5):  # one at a time: slots 0,1,2 then 3 -> slot 0, 4 -> slot 1
        bank.add(_maps([v]), torch.tensor([1]), _ids([v]))
    feats, ids = bank.get(1)
    assert feats[:, 0, 0, 0].tolist() == [3, 4, 2]
    assert ids[:, 0].tolist() == [3, 4, 2]
    assert bank.counts().tolist() == [0, 3]
    assert bank.seen().tolist() == [0, 5]


def test_batched_add_matches_sequential_with_many_samples_of_one_class():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 2])
    values = list(range(100, 100 + labels.numel()))
    batched = ReferenceBank(3, 3, SHAPE)
    batched.add(_maps([7]), torch.tensor([0]), _ids([7]))  # write pointer of class 0 not at 0
    batched.add(_maps(values), labels, _ids(values))
    sequential = ReferenceBank(3, 3, SHAPE)
    sequential.add(_maps([7]), torch.tensor([0]), _ids([7]))
    for v, lab in zip(values, labels.tolist()):
        sequential.add(_maps([v]), torch.tensor([lab]), _ids([v]))
    for cls in range(3):
        fb, ib = batched.get(cls)
        fs, is_ = sequential.get(cls)
        assert torch.equal(fb, fs) and torch.equal(ib, is_)
    # class 0 got 7 samples in the batch and keeps the last three of them
    assert sorted(batched.get(0)[1][:, 0].tolist()) == [106, 108, 109]
    assert batched.counts().tolist() == [3, 2, 2]



def test_without_replacing_a_full_class_keeps_its_first_maps_batched_or_one_by_one():
    labels = torch.tensor([0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 2])
    values = list(range(100, 100 + labels.numel()))
    batched, sequential = ReferenceBank(3, 3, SHAPE), ReferenceBank(3, 3, SHAPE)
    for bank in (batched, sequential):
        bank.add(_maps([7]), torch.tensor([0]), _ids([7]), replace=False)   # one place taken
    batched.add(_maps(values), labels, _ids(values), replace=False)
    for v, lab in zip(values, labels.tolist()):
        sequential.add(_maps([v]), torch.tensor([lab]), _ids([v]), replace=False)
    for cls in range(3):
        fb, ib = batched.get(cls)
        fs, is_ = sequential.get(cls)
        assert torch.equal(fb, fs) and torch.equal(ib, is_)
    # class 0 had room for two of its seven: the first two, after the earlier one
    assert batched.get(0)[1][:, 0].tolist() == [7, 100, 102]
    assert batched.get(0)[0][:, 0, 0, 0].tolist() == [7, 100, 102]
    assert batched.get(1)[1][:, 0].tolist() == [101, 107]
    assert batched.counts().tolist() == [3, 2, 2]
    assert batched.seen().tolist() == [8, 2, 2]           # the ones left out were offered
    # a full class takes nothing more; the others still fill up
    batched.add(_maps([1, 2, 3]), torch.tensor([0, 1, 1]), _ids([1, 2, 3]), replace=False)
    assert batched.get(0)[1][:, 0].tolist() == [7, 100, 102]
    assert batched.get(1)[1][:, 0].tolist() == [101, 107, 2]
    # a map that is not finite takes no place
    batched.add(_maps([float("nan"), 5]), torch.tensor([2, 2]), _ids([4, 5]), replace=False)
    assert batched.get(2)[1][:, 0].tolist() == [104, 110, 5]
    batched.reset()                                       # a new epoch fills up again
    batched.add(_maps([9]), torch.tensor([0]), _ids([9]), replace=False)
    assert batched.get(0)[1][:, 0].tolist() == [9]

def test_memory_is_fixed():
    bank = ReferenceBank(5, 4, SHAPE, dtype=torch.float16)
    before = bank.memory_bytes
    assert before >= 5 * 4 * 36 * 2
    bank.add(torch.randn(50, *SHAPE), torch.randint(0, 5, (50,)), _ids(list(range(50))))
    assert bank.memory_bytes == before
    assert bank.get(2)[0].dtype == torch.float16


def test_capacity_for_budget():
    cap = ReferenceBank.capacity_for_budget(10_000, 5, SHAPE, torch.float32)
    assert ReferenceBank(5, cap, SHAPE).memory_bytes <= 10_000
    assert ReferenceBank(5, cap + 1, SHAPE).memory_bytes > 10_000
    assert ReferenceBank.capacity_for_budget(10_000, 5, SHAPE, torch.bfloat16) > cap
    with pytest.raises(ValueError, match="at least one feature map per class"):
        ReferenceBank.capacity_for_budget(100, 5, SHAPE, torch.float32)


def test_non_finite_maps_are_rejected():
    bank = ReferenceBank(2, 4, SHAPE, dtype=torch.float16)
    feats = _maps([1, 2, 3, 4])
    feats[1, 0, 0, 0] = float("nan")
    feats[2, 1, 1, 1] = float("inf")
    feats[3, 0, 1, 1] = 1e6  # finite in float32 but overflows float16
    assert bank.add(feats, torch.tensor([0, 0, 1, 1]), _ids([1, 2, 3, 4])) == 3
    assert bank.counts().tolist() == [1, 0]


def test_gather_pads_and_masks():
    bank = ReferenceBank(3, 4, SHAPE)
    bank.add(_maps([1, 2, 3]), torch.tensor([0, 0, 2]), _ids([1, 2, 3]))
    feats, ids, valid = bank.gather(torch.tensor([2, 0, 1, 0]))
    assert feats.shape == (4, 2, *SHAPE) and ids.shape == (4, 2, 3)
    assert valid.tolist() == [[True, False], [True, True], [False, False], [True, True]]
    assert feats[:, :, 0, 0, 0].tolist() == [[3, 0], [1, 2], [0, 0], [1, 2]]
    assert ids[:, :, 0].tolist() == [[3, -1], [1, 2], [-1, -1], [1, 2]]
    empty = bank.gather(torch.tensor([1]))
    assert empty[0].shape == (1, 0, *SHAPE) and empty[2].shape == (1, 0)


def test_state_dict_round_trip():
    bank = ReferenceBank(3, 2, SHAPE, dtype=torch.bfloat16)
    bank.add(torch.randn(7, *SHAPE), torch.tensor([0, 0, 0, 1, 2, 2, 1]), _ids(list(range(7))))
    state = bank.state_dict()
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    other = ReferenceBank(3, 2, SHAPE, dtype=torch.bfloat16)
    other.load_state_dict(state)
    for cls in range(3):
        assert torch.equal(bank.get(cls)[0], other.get(cls)[0])
        assert torch.equal(bank.get(cls)[1], other.get(cls)[1])
    # the write pointers are restored too: the next add overwrites the same slot in both
    for b in (bank, other):
        b.add(_maps([9]), torch.tensor([0]), _ids([9]))
    assert torch.equal(bank.get(0)[1], other.get(0)[1])
    with pytest.raises(ValueError, match="capacity_per_class"):
        ReferenceBank(3, 5, SHAPE).load_state_dict(state)


def test_reset():
    bank = ReferenceBank(2, 2, SHAPE)
    bank.add(_maps([1, 2]), torch.tensor([0, 1]), _ids([1, 2]))
    bank.reset()
    assert bank.counts().tolist() == [0, 0] and len(bank) == 0
    assert bank.gather(torch.tensor([0]))[0].shape == (1, 0, *SHAPE)


def test_errors():
    with pytest.raises(ValueError, match="capacity_per_class"):
        ReferenceBank(2, 0, SHAPE)
    with pytest.raises(ValueError, match="feature_shape"):
        ReferenceBank(2, 2, (4, 3))
    with pytest.raises(ValueError, match="dtype"):
        ReferenceBank(2, 2, SHAPE, dtype=torch.int64)
    bank = ReferenceBank(2, 2, SHAPE)
    with pytest.raises(ValueError, match=r"shape \(B, 4, 3, 3\)"):
        bank.add(torch.randn(2, 4, 3, 4), torch.tensor([0, 1]), _ids([1, 2]))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        bank.add(torch.randn(2, *SHAPE), torch.tensor([0, 2]), _ids([1, 2]))
    with pytest.raises(ValueError, match="`labels` to have shape"):
        bank.add(torch.randn(2, *SHAPE), torch.tensor([0]), _ids([1, 2]))
    with pytest.raises(ValueError, match="`ids` to have shape"):
        bank.add(torch.randn(2, *SHAPE), torch.tensor([0, 1]), torch.zeros(2, 2).long())
    with pytest.raises(TypeError, match="integer tensor"):
        bank.add(torch.randn(2, *SHAPE), torch.tensor([0.0, 1.0]), _ids([1, 2]))
    with pytest.raises(TypeError, match="floating point"):
        bank.add(torch.zeros(2, *SHAPE, dtype=torch.long), torch.tensor([0, 1]), _ids([1, 2]))
    with pytest.raises(ValueError, match="class index"):
        bank.get(5)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        bank.gather(torch.tensor([3]))


@pytest.mark.parametrize("rows", [[0, 2, 3, 5, 6, 7, 8, 9, 10],      # most rows: the spare row
                                  [1, 4],                             # few rows: gathered
                                  list(range(11))])                   # all of them
def test_adding_rows_of_a_batch_equals_adding_those_rows(rows):
    labels = torch.tensor([0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 2])
    values = list(range(100, 111))
    maps = _maps(values)
    maps[3, 0, 0, 0] = float("nan")                       # refused wherever it is picked
    picked = torch.tensor(rows)
    direct, gathered = ReferenceBank(3, 3, SHAPE), ReferenceBank(3, 3, SHAPE)
    for bank in (direct, gathered):
        bank.add(_maps([7]), torch.tensor([0]), _ids([7]))    # write pointer of class 0 not at 0
    for _ in range(2):                                        # (the second time wraps around)
        rejected = direct.add(maps, labels, _ids(values), rows=picked)
        assert rejected == gathered.add(maps[picked], labels[picked], _ids(values)[picked])
        assert rejected == (3 in rows)
    for cls in range(3):
        assert all(torch.equal(a, b) for a, b in zip(direct.get(cls), gathered.get(cls)))
    assert torch.equal(direct.seen(), gathered.seen()) and torch.equal(direct.counts(), gathered.counts())
    assert bool(torch.isfinite(direct.get(0)[0]).all())
    state = direct.state_dict()                               # the spare row is not state
    assert state["features"].shape == (3, 3, *SHAPE)
    assert direct.memory_bytes == ReferenceBank(3, 3, SHAPE).memory_bytes


def test_rows_must_be_increasing_indices_into_the_batch():
    bank = ReferenceBank(2, 2, SHAPE)
    maps, labels, ids = _maps([1, 2, 3]), torch.tensor([0, 1, 0]), _ids([1, 2, 3])
    for bad in ([2, 0], [0, 0], [0, 3], [-1, 1]):
        with pytest.raises(ValueError, match="increasing indices in"):
            bank.add(maps, labels, ids, rows=torch.tensor(bad))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        bank.add(maps, labels, ids, rows=torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="integer tensor"):
        bank.add(maps, labels, ids, rows=torch.tensor([0.0, 1.0]))
    assert bank.add(maps, labels, ids, rows=torch.tensor([], dtype=torch.long)) == 0
    assert len(bank) == 0
