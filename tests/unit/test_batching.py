"""Property tests of DataParallel's pure logic: the divmod split, gather, pad/trim, device ids and the call plan."""
from __future__ import annotations

import collections
import types
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from neuron_client.models import batching
from neuron_client.models.data_parallel import DataParallel, parse_device_id, parse_device_ids
from neuron_client.wire.errors import InputShapeError

Pair = collections.namedtuple("Pair", "left right")
DTYPES = [torch.float32, torch.int64, torch.bool]


@st.composite
def batched_tensor(draw, n: int, dim: int):
    ndim = draw(st.integers(dim + 1, dim + 3))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = n
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.randn(shape).mul(10)
    return t > 0 if dtype == torch.bool else t.to(dtype)


def nestings(n: int, dim: int):
    """Nestings of tuples, lists, dicts and named tuples whose tensors all have ``n`` items along ``dim``."""
    leaves = st.one_of(batched_tensor(n, dim), batched_tensor(n, dim), st.none(), st.integers(-5, 5),
                       st.text(max_size=3))

    def extend(children):
        return st.one_of(
            st.lists(children, max_size=3).map(tuple),
            st.lists(children, max_size=3),
            st.dictionaries(st.text("abc", min_size=1, max_size=2), children, max_size=3),
            st.tuples(children, children).map(lambda p: Pair(*p)),
        )

    return st.recursive(leaves, extend, max_leaves=6)


def same(a, b) -> bool:
    """Structural equality: same container types and keys, equal tensors (shape, dtype, values), equal leaves."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def leaves(obj) -> list:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in leaves(v)]
    return [obj]


# -- the divmod rule ---------------------------------------------------------------------------------------------
@given(st.integers(0, 200), st.integers(1, 16))
def test_chunk_sizes_follow_divmod(n, k):
    sizes = batching.chunk_sizes(n, k)
    q, r = divmod(n, k)
    assert sum(sizes) == n
    assert len(sizes) == min(n, k)  # fewer items than cores: as many chunks as items
    assert all(s > 0 for s in sizes)  # never an empty chunk
    assert sizes == [q + 1] * r + [q] * (len(sizes) - r)


def test_chunk_sizes_examples():
    assert batching.chunk_sizes(5, 3) == [2, 2, 1]
    assert batching.chunk_sizes(8, 4) == [2, 2, 2, 2]
    assert batching.chunk_sizes(2, 4) == [1, 1]
    assert batching.chunk_sizes(0, 4) == []
    with pytest.raises(ValueError):
        batching.chunk_sizes(3, 0)


@given(st.integers(0, 100), st.integers(1, 9))
def test_piece_sizes(n, size):
    pieces = batching.piece_sizes(n, size)
    assert sum(pieces) == n
    assert all(p == size for p in pieces[:-1])
    assert all(0 < p <= size for p in pieces)
    assert len(pieces) == -(-n // size)


# -- split and gather --------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_split_then_gather_gives_back_the_input(data):
    n = data.draw(st.integers(0, 12), "n")
    k = data.draw(st.integers(1, 6), "k")
    dim = data.draw(st.integers(0, 2), "dim")
    obj = data.draw(nestings(n, dim), "inputs")
    sizes = batching.chunk_sizes(n, k)
    chunks = batching.split(obj, sizes, dim)
    assert len(chunks) == len(sizes)
    for chunk, size in zip(chunks, sizes):
        assert [t.shape[dim] for t in batching.tensors(chunk)] == [size] * len(batching.tensors(obj))
        # non-tensor leaves go to every chunk unchanged (the same objects)
        assert [x for x in leaves(chunk) if not isinstance(x, torch.Tensor)] == \
            [x for x in leaves(obj) if not isinstance(x, torch.Tensor)]
    if sizes:
        assert same(batching.gather(chunks, dim), obj)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_batch_size_is_the_common_size(data):
    n = data.draw(st.integers(0, 9))
    dim = data.draw(st.integers(0, 2))
    obj = data.draw(nestings(n, dim))
    expected = n if batching.tensors(obj) else None
    assert batching.batch_size(obj, dim) == expected


def test_batch_size_errors():
    with pytest.raises(ValueError, match="same size"):
        batching.batch_size((torch.zeros(2, 3), {"a": torch.zeros(3, 3)}), 0)
    with pytest.raises(ValueError, match="has no dim 2"):
        batching.batch_size((torch.zeros(2, 3),), 2)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_pad_then_trim_round_trip(data):
    size = data.draw(st.integers(1, 6))
    m = data.draw(st.integers(0, size))
    dim = data.draw(st.integers(0, 2))
    obj = data.draw(nestings(m, dim))
    padded = batching.pad(obj, size, dim)
    for orig, p in zip(batching.tensors(obj), batching.tensors(padded)):
        assert p.shape[dim] == size and p.dtype == orig.dtype
        assert torch.equal(p.narrow(dim, 0, m), orig)
        assert not p.narrow(dim, m, size - m).any()  # zeros
    assert same(batching.trim(padded, m, size, dim), obj)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_dynamic_batching_plan_round_trip(data):
    """chunk -> pieces of the traced size -> pad -> (identity model) -> trim -> gather is the identity."""
    n = data.draw(st.integers(1, 15))
    k = data.draw(st.integers(1, 5))
    b = data.draw(st.integers(1, 4))
    obj = data.draw(nestings(n, 0).filter(lambda o: batching.tensors(o)))
    pieces = [p for c in batching.chunk_sizes(n, k) for p in batching.piece_sizes(c, b)]
    outs = []
    for piece, real in zip(batching.split(obj, pieces, 0), pieces):
        carried = batching.pad(piece, b, 0)
        assert {t.shape[0] for t in batching.tensors(carried)} == {b}  # the model only sees its traced size
        outs.append(batching.trim(carried, real, b, 0))
    assert same(batching.gather(outs, 0), obj)


def test_gather_keeps_structure_and_none():
    a = (torch.ones(2, 1), {"x": [torch.zeros(2), None]}, None)
    b = (torch.ones(1, 1) * 2, {"x": [torch.ones(1), None]}, None)
    out = batching.gather([a, b], 0)
    assert isinstance(out, tuple) and out[2] is None and out[1]["x"][1] is None
    assert torch.equal(out[0], torch.tensor([[1.0], [1.0], [2.0]]))
    assert torch.equal(out[1]["x"][0], torch.tensor([0.0, 0.0, 1.0]))


def test_gather_along_other_dim():
    parts = [torch.full((1, 3, 2), float(i)) for i in range(3)]
    assert batching.gather(parts, 1).shape == (1, 9, 2)


def test_gather_unsqueezes_scalars_with_a_warning():
    with pytest.warns(UserWarning, match="scalar"):
        out = batching.gather([torch.tensor(1.0), torch.tensor(2.0)], 0)
    assert torch.equal(out, torch.tensor([1.0, 2.0]))
    with pytest.warns(UserWarning, match="scalar"):
        assert batching.gather([torch.tensor(3.0)], 0).shape == (1,)


def test_gather_rejects_mismatched_dicts():
    with pytest.raises(ValueError, match="different keys"):
        batching.gather([{"a": torch.ones(1)}, {"b": torch.ones(1)}], 0)


def test_gather_non_tensor_leaves():
    assert batching.gather([3, 3], 0) == 3
    assert batching.gather([3, 4], 0) == [3, 4]


# -- device ids --------------------------------------------------------------------------------------------------
def test_device_ids_ints_and_nc_strings_sorted():
    assert parse_device_ids(["nc:2", 0, "nc:1"], 4) == [0, 1, 2]
    assert parse_device_ids(None, 3) == [0, 1, 2]
    assert parse_device_id("nc:13") == 13


@pytest.mark.parametrize("bad", ["gpu:0", "nc:", "nc:-1", "0", 1.0, None, True, "nc:1x"])
def test_device_ids_reference_error(bad):
    with pytest.raises(ValueError, match=r"Expected `nc:#` or an integer, but got: "):
        parse_device_ids([bad], 4)


def test_device_ids_beyond_owned_cores():
    with pytest.raises(ValueError, match="owns 4 NeuronCores"):
        parse_device_ids([0, 4], 4)
    with pytest.raises(ValueError, match="owns 2 NeuronCores"):
        parse_device_ids([-1], 2)
    with pytest.raises(ValueError, match="more than once"):
        parse_device_ids([1, "nc:1"], 4)
    with pytest.raises(ValueError, match="empty"):
        parse_device_ids([], 4)


# -- the call plan (no sockets: a DataParallel whose model is a stand-in) -----------------------------------------
def planner(traced_shape, k: int, dim: int = 0, dynamic: bool = True) -> DataParallel:
    dp = DataParallel.__new__(DataParallel)
    dp.module = types.SimpleNamespace(input_specs=[{"shape": list(traced_shape), "dtype": "float32"}])
    dp.dim, dp.device_ids, dp.set_dynamic_batching = dim, list(range(k)), dynamic
    dp.traced_size = dp._traced_size()
    return dp


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 30), st.integers(1, 8), st.integers(1, 5))
def test_dynamic_plan_only_carries_the_traced_batch(n, k, b):
    dp = planner([b, 3], k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = dp._plan((torch.randn(n, 3),))
    assert len(plan) == max(1, min(n, k))
    assert all(args[0].shape == (b, 3) and carried == b for calls in plan for args, _, carried in calls)
    reals = [sum(real for _, real, _ in calls) for calls in plan]
    assert reals == (batching.chunk_sizes(n, k) or [0])
    assert bool(caught) == (n % k != 0)  # a warning exactly when the batch does not divide evenly


def test_static_plan_requires_cores_times_traced_size():
    dp = planner([1, 3, 8, 8], 4, dynamic=False)
    with pytest.raises(InputShapeError, match=r"must have 4 items along dim 0 \(4 x 1\), but it has 8"):
        dp._plan((torch.randn(8, 3, 8, 8),))
    plan = dp._plan((torch.randn(4, 3, 8, 8),))
    assert [calls[0][0][0].shape[0] for calls in plan] == [1, 1, 1, 1]
    dp2 = planner([1, 3, 8, 8], 4, dim=2, dynamic=False)
    plan = dp2._plan((torch.randn(1, 3, 32, 8),))
    assert [tuple(calls[0][0][0].shape) for calls in plan] == [(1, 3, 8, 8)] * 4
    with pytest.raises(InputShapeError, match="dim != 0"):
        dp2._plan((torch.randn(1, 3, 30, 8),))
