"""Unit tests of autobucketing and io_aliases (neuron_client.tracing.bucketing, neuron_client.tracing.io_aliases), in-process, no broker.

Kernels pad and choose buckets; a packaged model equals the unbucketed model on unpadded inputs, refuses what fits no
bucket, stores shared weights once, writes aliased outputs into its state (its own buffers or a shared state buffer
sliced per bucket), and survives torch.jit.save / torch.jit.load.
"""
from __future__ import annotations

import io
from typing import List

import pytest
import torch
from hypothesis import given, settings, strategies as st

import neuron_client
from neuron_client.tracing import bucketing, io_aliases as state, meta as trace_meta, script
from neuron_client.tracing.bucketing import BucketModelConfig, bucket_model_trace, package_buckets
from neuron_client.wire import codec, messages


def roundtrip_graph(placed):
    """The saved bytes of a self-placing module, without loading it (torch.jit.load would place it on cores)."""
    buf = io.BytesIO()
    torch.jit.save(placed, buf)
    return None, buf.getvalue()


def roundtrip(module):
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    data = buf.getvalue()
    return torch.jit.load(io.BytesIO(data)), data


class Causal(torch.nn.Module):
    """Per-token features and a running sum along the sequence: real positions never see the padding after them."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.lin = torch.nn.Linear(d, d)

    def forward(self, ids, mask):
        h = self.lin(self.emb(ids)) * mask.unsqueeze(-1)
        return h.cumsum(1), h.sum(-1).sum(-1)


def ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 50, (1, n), generator=g), torch.ones(1, n, dtype=torch.long)


@pytest.fixture(scope="module")
def causal():
    torch.manual_seed(0)
    return Causal().eval()


@pytest.fixture(scope="module")
def packaged(causal):
    cfg = BucketModelConfig(bucketing.sequence_length_kernel, bucket_kernel_constant_args=((4, 8, 16),))
    return package_buckets(lambda: (causal, {}), [ids(4), ids(8), ids(16)], cfg)


# -- kernels ------------------------------------------------------------------------------------------------------


@given(n=st.integers(1, 20), extra=st.integers(1, 3))
@settings(max_examples=40, deadline=None)
def test_sequence_length_kernel_pads_to_the_smallest_bucket(n, extra):
    kernel = bucketing.sequence_length_kernel((4, 8, 16), dim=1, padded_inputs=extra)
    inputs = [torch.full((2, n), 7, dtype=torch.long) for _ in range(extra)] + [torch.tensor([3])]
    padded, idx = kernel(inputs)
    if n > 16:
        assert padded == [] and int(idx) == 3
        return
    want = next(i for i, b in enumerate((4, 8, 16)) if n <= b)
    b = (4, 8, 16)[want]
    assert int(idx) == want and len(padded) == extra + 1
    for p in padded[:extra]:
        assert p.shape == (2, b) and torch.equal(p[:, :n], torch.full((2, n), 7)) and not p[:, n:].any()
    assert torch.equal(padded[-1], torch.tensor([3]))  # not padded


def test_kernel_pad_value_and_dim():
    kernel = bucketing.sequence_length_kernel([3, 6], dim=0, pad_value=-1)
    (p,), idx = kernel([torch.ones(4, 2)])
    assert int(idx) == 1 and p.shape == (6, 2) and (p[4:] == -1).all()


def test_kernel_lengths_must_increase():
    with pytest.raises(ValueError, match="increasing"):
        bucketing.sequence_length_kernel([8, 4])


def seed_kernel(tensor_list: List[torch.Tensor]):
    return tensor_list, torch.tensor([0])


def test_resolve_kernel_accepts_a_factory_a_function_or_a_scripted_kernel():
    scripted = torch.jit.script(seed_kernel)
    for k in (BucketModelConfig(lambda: scripted), BucketModelConfig(lambda: seed_kernel), BucketModelConfig(scripted),
              BucketModelConfig(lambda a, b: scripted, bucket_kernel_constant_args=(1, 2))):
        assert isinstance(bucketing.resolve_kernel(k), torch.jit.ScriptFunction)


def not_scriptable(tensor_list):
    shapes = {id(t): t for t in tensor_list}
    return tensor_list, torch.tensor([len(shapes)])


def wrong_signature(x: torch.Tensor):
    return x


def test_resolve_kernel_errors_are_clear():
    with pytest.raises(ValueError, match=r"cannot be compiled with torch.jit.script.*line \d+"):
        bucketing.resolve_kernel(BucketModelConfig(lambda: not_scriptable))
    with pytest.raises(ValueError, match=r"must be \(List\[Tensor\]\) -> Tuple\[List\[Tensor\], Tensor\]"):
        bucketing.resolve_kernel(BucketModelConfig(lambda: wrong_signature))
    with pytest.raises(ValueError, match="raised ZeroDivisionError"):
        bucketing.resolve_kernel(BucketModelConfig(lambda: 1 / 0))
    with pytest.raises(ValueError, match="constant_args are for a kernel factory"):
        bucketing.resolve_kernel(BucketModelConfig(torch.jit.script(seed_kernel), bucket_kernel_constant_args=(1,)))


# -- output structure ------------------------------------------------------------------------------------------------

trees = st.recursive(st.just("t"), lambda kids: st.tuples(st.sampled_from(["tuple", "list"]),
                                                          st.lists(kids, max_size=3)), max_leaves=8)


def build(spec, counter):
    if spec == "t":
        counter[0] += 1
        return torch.tensor([counter[0]])
    kind, items = spec
    out = [build(s, counter) for s in items]
    return tuple(out) if kind == "tuple" else out


@given(trees)
@settings(max_examples=60, deadline=None)
def test_flatten_unflatten_round_trip(spec):
    obj = build(spec, [0])
    flat, got = bucketing.flatten(obj)
    again = bucketing.unflatten(flat, got)
    assert bucketing.flatten(again)[1] == got
    assert [int(t) for t in bucketing.flatten(again)[0]] == [int(t) for t in flat]


# -- packaged models ------------------------------------------------------------------------------------------------


def test_packaged_model_matches_the_model_at_every_length(causal, packaged):
    loaded, _ = roundtrip(packaged)
    for n in (1, 3, 4, 5, 8, 9, 16):
        x = ids(n, seed=n)
        want = causal(*x)
        got = loaded(*x)
        assert [tuple(g.shape) for g in got] == [(1, n, 8), (1,)]
        assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-5)


def test_too_long_names_the_shapes(packaged):
    with pytest.raises(Exception, match=r"inputs of shapes \[\[1, 17\], \[1, 17\]\] fit no bucket.*\[1, 16\]"):
        packaged(*ids(17))


def test_run_takes_the_inputs_as_one_list(packaged):
    x = ids(5)
    assert torch.equal(packaged.run(list(x))[0], packaged(*x)[0])


def test_meta_records_the_buckets_and_the_output_structure(packaged):
    _, data = roundtrip(packaged)
    meta = trace_meta.read_meta(data)
    assert meta["bucketed"] is True and meta["outputs"] == ["tuple", ["t", "t"]]
    assert [[s["shape"] for s in b] for b in meta["buckets"]] == [[[1, 4]] * 2, [[1, 8]] * 2, [[1, 16]] * 2]
    out = bucketing.unpack_outputs(packaged(*ids(3)), meta)
    assert isinstance(out, tuple) and len(out) == 2


def test_untrimmed_outputs_keep_the_bucket_length(causal):
    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),))
    m = package_buckets(causal, [ids(4), ids(8)], cfg, trim_outputs=False)
    assert m(*ids(5))[0].shape == (1, 8, 8)


def test_examples_must_fit_their_buckets_in_order(causal):
    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),))
    with pytest.raises(ValueError, match="sends bucket 0's example inputs .* to bucket 1"):
        package_buckets(causal, [ids(8), ids(4)], cfg)
    with pytest.raises(ValueError, match="to bucket 0 with shapes"):
        package_buckets(causal, [ids(3), ids(8)], cfg)
    with pytest.raises(ValueError, match="one tuple of inputs per bucket"):
        package_buckets(causal, [], cfg)
    with pytest.raises(ValueError, match="func_kwargs must be a list of 2 dicts"):
        package_buckets(lambda: causal, [ids(4), ids(8)],
                           BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),), func_kwargs=[{}]))


def test_weights_are_stored_once(causal):
    big = Causal(d=256).eval()
    one = package_buckets(big, [ids(4)], BucketModelConfig(bucketing.sequence_length_kernel, ((4,),)))
    two = package_buckets(big, [ids(4), ids(8)], BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),)))
    weights = sum(p.numel() * 4 for p in big.parameters())
    s1, s2 = len(roundtrip(one)[1]), len(roundtrip(two)[1])
    assert s1 > weights and s2 - s1 < weights / 4


def test_separately_built_models_share_identical_weights(causal):
    state_dict = causal.state_dict()

    def build_model(width):
        m = Causal()
        m.load_state_dict(state_dict)  # the same values in a different instance per bucket
        return m.eval()

    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),), func_kwargs=[{"width": 4}, {"width": 8}])
    m = package_buckets(build_model, [ids(4), ids(8)], cfg)
    assert trace_meta.get_meta(m)["deduplicated_weight_bytes"] == sum(t.numel() * 4 for t in state_dict.values())
    loaded, _ = roundtrip(m)
    assert torch.allclose(loaded(*ids(6))[0], causal(*ids(6))[0], atol=1e-6)


# -- state ------------------------------------------------------------------------------------------------------------


class Counter(torch.nn.Module):
    """State of the bucket's length: adds the input to it and returns (input + old state, new state)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("mem", torch.zeros(1, n))

    def forward(self, x):
        return x + self.mem, self.mem + x


def test_shared_state_buffer_is_sliced_per_bucket_and_updated_in_place():
    def get(n):
        m = Counter(n)
        return m, {m.mem: 1}

    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),), shared_state_buffer=[torch.zeros(1, 8)],
                            func_kwargs=[{"n": 4}, {"n": 8}])
    m, data = roundtrip(package_buckets(get, [torch.zeros(1, 4), torch.zeros(1, 8)], cfg))
    meta = trace_meta.read_meta(data)
    assert meta["io_aliases"] == {"shared_state[0]": 1} and meta["outputs"] == ["tuple", ["t"]]
    shadow = torch.zeros(1, 8)
    for n in (3, 6, 2, 8, 4):
        x = torch.arange(1.0, n + 1).reshape(1, n)
        b = 4 if n <= 4 else 8
        padded = torch.cat([x, torch.zeros(1, b - n)], 1)
        want = (padded + shadow[:, :b])[:, :n]
        shadow[:, :b] += padded
        (got,) = m(x)
        assert torch.equal(got, want), n
    assert torch.equal(m.shared_state[0], shadow)


def reversed_slices(shapes: List[List[List[int]]], states: List[torch.Tensor], bucket_idx: torch.Tensor
                    ) -> List[torch.Tensor]:
    idx = int(bucket_idx.item())
    out: List[torch.Tensor] = []
    for j in range(len(states)):
        n = shapes[idx][j][1]
        out.append(states[j].narrow(1, states[j].shape[1] - n, n))  # the trailing part, as the reference's example
    return out


def test_custom_state_preprocessor_factory():
    def get(n):
        m = Counter(n)
        return m, {"mem": 1}

    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),), shared_state_buffer=[torch.zeros(1, 8)],
                            shared_state_buffer_preprocessor=lambda: torch.jit.script(reversed_slices),
                            func_kwargs=[{"n": 4}, {"n": 8}])
    m = package_buckets(get, [torch.zeros(1, 4), torch.zeros(1, 8)], cfg)
    m(torch.ones(1, 4))
    assert torch.equal(m.shared_state[0], torch.tensor([[0.0] * 4 + [1.0] * 4]))


def test_shared_state_must_fit():
    def get(n):
        m = Counter(n)
        return m, {m.mem: 1}

    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),), shared_state_buffer=[torch.zeros(1, 6)],
                            func_kwargs=[{"n": 4}, {"n": 8}])
    with pytest.raises(ValueError, match="does not fit in the shared state buffer"):
        package_buckets(get, [torch.zeros(1, 4), torch.zeros(1, 8)], cfg)


def test_bucket_models_own_state_without_a_shared_buffer():
    m = Counter(4)
    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4,),))
    packaged, _ = roundtrip(package_buckets(lambda: (m, {m.mem: 1}), [torch.zeros(1, 4)], cfg))
    packaged(torch.ones(1, 2))
    (out,) = packaged(torch.ones(1, 2))
    assert torch.equal(out, torch.full((1, 2), 2.0))
    assert not m.mem.any()  # tracing ran the model once; its state was put back


class Accumulate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x):
        new = self.total + x
        return new.sum(), new


def test_trace_with_input_output_aliases_keeps_state_in_the_graph():
    m = Accumulate()
    traced = neuron_client.trace(m, torch.ones(3), input_output_aliases={m.total: 1})
    assert not m.total.any()  # the trace left the module's state as it found it
    assert [float(traced(torch.ones(3))[0]) for _ in range(3)] == [3.0, 6.0, 9.0]  # run here, state in the graph
    _, data = roundtrip_graph(traced)
    loaded = torch.jit.load(io.BytesIO(script.parts_of(traced)[0]))  # the graph a worker runs: from the traced state
    assert [float(loaded(torch.ones(3))[0]) for _ in range(3)] == [3.0, 6.0, 9.0]
    meta = trace_meta.read_meta(data)
    assert meta["io_aliases"] == {"model.total": 1} and meta["state_bytes"] == 12


def test_io_alias_errors():
    m = Accumulate()
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a buffer"):
        state.buffer_names(m, {"nope": 1})
    with pytest.raises(ValueError, match="parameter 'weight'"):
        state.buffer_names(lin, {lin.weight: 0})
    with pytest.raises(ValueError, match="non-negative output index"):
        state.buffer_names(m, {m.total: -1})
    with pytest.raises(ValueError, match=r"output 0 \(float32\[\]\) cannot be written into state buffer 'total'"):
        neuron_client.trace(m, torch.ones(3), input_output_aliases={m.total: 0})
    with pytest.raises(ValueError, match="returns 2 outputs"):
        neuron_client.trace(m, torch.ones(3), input_output_aliases={m.total: 5})


def test_traffic_meter_counts_tensor_bytes_and_restores_the_codec():
    encode, decode = codec.encode, codec.decode
    with state.TrafficMeter() as meter:
        frames = codec.encode(messages.Call(token="t", model_id=1, args=(torch.zeros(100),)), 1)
        codec.decode(codec.encode(messages.Result(outputs=(torch.zeros(10, dtype=torch.float64),)), 1))
        with pytest.raises(RuntimeError, match="already active"):
            state.TrafficMeter().__enter__()
    assert codec.encode is encode and codec.decode is decode
    assert meter.calls == 1 and meter.sent >= 400 + len(frames[0]) - 1 and 80 <= meter.received < 200


def test_bucket_model_trace_is_the_package_in_the_self_placing_form():
    causal = Causal()
    cfg = BucketModelConfig(bucketing.sequence_length_kernel, ((4, 8),))
    placed = bucket_model_trace(causal, [ids(4), ids(8)], cfg)
    package = package_buckets(causal, [ids(4), ids(8)], cfg)
    assert script.is_placed_script(placed) and trace_meta.get_meta(placed)["bucketed"] is True
    x = ids(6)
    got, want = placed(*x), bucketing.unpack_outputs(package(*x), trace_meta.get_meta(package))
    assert all(torch.equal(a, b) for a, b in zip(script.flatten(got)[0], script.flatten(want)[0]))
