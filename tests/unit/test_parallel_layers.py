"""Tensor-parallel layers against torch.nn.Linear on random weights, every rank simulated in this process: one
thread per rank, each in its own ``parallel_state.rank_context``, with real gloo collectives between the threads."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from neuron_client.distributed import collectives
from neuron_client.distributed.parallel_layers import checkpointing, layers, mappings, parallel_state
from worker import groups


def run_ranks(size: int, fn, tmp_path, timeout_s: float = 60.0) -> list:
    """``fn(rank)`` in ``size`` threads, each a rank of a gloo group; their results in rank order."""
    store = str(tmp_path / f"store-{size}-{os.urandom(4).hex()}")
    results, errors = [None] * size, []

    def rank_main(rank: int) -> None:
        group = None
        try:
            group = groups.form_group(f"test{size}", rank, size, store, timeout_s=timeout_s)
            with parallel_state.rank_context(rank, size), collectives.active(group), torch.no_grad():
                results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((rank, exc))
        finally:
            if group is not None:
                group.close()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0][1]
    return results


def full_state(linear: torch.nn.Linear) -> dict:
    return {"weight": linear.weight.detach().clone(), "bias": linear.bias.detach().clone()}


def sharded(cls, full: dict, *args, **kwargs):
    """Build ``cls(*args, **kwargs)`` for the current rank and load the full weights into it (sliced)."""
    layer = cls(*args, **kwargs)
    layer.load_state_dict(checkpointing.shard_state_dict(layer, full))
    return layer


@pytest.mark.parametrize("size", [1, 2, 4])
def test_column_parallel_gathered_equals_linear(size, tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 12)
    x = torch.randn(3, 5, 16)
    want = ref(x).detach()
    outs = run_ranks(size, lambda r: sharded(layers.ColumnParallelLinear, full_state(ref), 16, 12,
                                             gather_output=True)(x), tmp_path)
    for out in outs:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [2, 4])
def test_column_parallel_without_gather_gives_each_rank_its_slice(size, tmp_path):
    torch.manual_seed(1)
    ref = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8)
    want = ref(x).detach()

    def rank_fn(rank):
        layer = sharded(layers.ColumnParallelLinear, full_state(ref), 8, 16, gather_output=False)
        assert layer.weight.shape == (16 // size, 8) and layer.bias.shape == (16 // size,)
        return layer(x)

    outs = run_ranks(size, rank_fn, tmp_path)
    for rank, out in enumerate(outs):
        chunk = 16 // size
        torch.testing.assert_close(out, want[:, rank * chunk:(rank + 1) * chunk], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs, -1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_row_parallel_scatters_a_full_input(size, tmp_path):
    torch.manual_seed(2)
    ref = torch.nn.Linear(16, 6)
    x = torch.randn(2, 3, 16)
    want = ref(x).detach()

    def rank_fn(rank):
        layer = sharded(layers.RowParallelLinear, full_state(ref), 16, 6, input_is_parallel=False)
        assert layer.weight.shape == (6, 16 // size) and layer.bias.shape == (6,)  # the bias is replicated
        return layer(x)

    for out in run_ranks(size, rank_fn, tmp_path):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [2, 4])
def test_row_parallel_takes_a_parallel_input(size, tmp_path):
    torch.manual_seed(3)
    ref = torch.nn.Linear(12, 5)
    x = torch.randn(7, 12)
    want = ref(x).detach()
    chunk = 12 // size
    outs = run_ranks(size, lambda r: sharded(layers.RowParallelLinear, full_state(ref), 12, 5,
                                             input_is_parallel=True)(x[:, r * chunk:(r + 1) * chunk]), tmp_path)
    for out in outs:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [2, 4])
def test_column_then_row_is_the_megatron_mlp(size, tmp_path):
    """Column (no gather) -> gelu -> Row (parallel input): one all-reduce, the unsharded MLP's output."""
    torch.manual_seed(4)
    up, down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    x = torch.randn(2, 8)
    want = down(torch.nn.functional.gelu(up(x))).detach()

    def rank_fn(rank):
        a = sharded(layers.ColumnParallelLinear, full_state(up), 8, 32, gather_output=False)
        b = sharded(layers.RowParallelLinear, full_state(down), 32, 8, input_is_parallel=True)
        return b(torch.nn.functional.gelu(a(x)))

    for out in run_ranks(size, rank_fn, tmp_path):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_checkpoint_load_unsharded_and_sharded(tmp_path):
    """parallel_layers.load slices a full checkpoint per rank; save/load of per-rank shards round-trips."""
    torch.manual_seed(5)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    full = tmp_path / "full.pt"
    torch.save({"model": ref.state_dict()}, full)

    def build():
        return torch.nn.Sequential(layers.ColumnParallelLinear(8, 16, gather_output=False),
                                   layers.RowParallelLinear(16, 8, input_is_parallel=True))

    shards_dir = str(tmp_path / "shards")
    for rank in range(2):
        with parallel_state.rank_context(rank, 2):
            m = build()
            checkpointing.load(str(full), m, sharded=False)
            torch.testing.assert_close(m[0].weight, ref[0].weight[rank * 8:(rank + 1) * 8])
            torch.testing.assert_close(m[1].weight, ref[1].weight[:, rank * 8:(rank + 1) * 8])
            torch.testing.assert_close(m[1].bias, ref[1].bias)
            checkpointing.save({"model": m.state_dict()}, shards_dir)
    assert sorted(os.listdir(shards_dir)) == ["tp_rank_00_pp_rank_00", "tp_rank_01_pp_rank_00"]
    with parallel_state.rank_context(1, 2):
        m = build()
        checkpointing.load(shards_dir, m, sharded=True)
        torch.testing.assert_close(m[0].bias, ref[0].bias[8:])
        with pytest.raises(ValueError, match="sharded=False"):
            checkpointing.load(str(full), m)  # a single file needs sharded=False
    with parallel_state.rank_context(0, 3), pytest.raises(ValueError, match="not divisible"):
        build()


def test_standins_let_a_single_process_trace():
    """Without a group, the collectives are shape-correct stand-ins, and the trace records them by name."""
    with parallel_state.rank_context(0, 2):
        layer = layers.ColumnParallelLinear(4, 6, gather_output=True)
        row = layers.RowParallelLinear(4, 3, input_is_parallel=False)
    x = torch.randn(2, 4)
    with parallel_state.rank_context(0, 2), torch.no_grad():
        assert layer(x).shape == (2, 6)
        traced = torch.jit.trace(torch.nn.Sequential(layer, torch.nn.Identity()), x)
        graph = str(traced.inlined_graph)
        assert "neuron::all_gather" in graph
        assert "neuron::all_reduce" in str(torch.jit.trace(row, x).inlined_graph)
    assert mappings.scatter_to_tensor_model_parallel_region(x) is x  # one rank: identity


def test_parallel_state_contexts_are_per_thread():
    seen = {}

    def other():
        seen["other"] = (parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_tensor_model_parallel_size())

    with parallel_state.rank_context(1, 4):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        seen["here"] = (parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_size())
    assert seen == {"here": (1, 4), "other": (0, 1)}
    with pytest.raises(ValueError):
        with parallel_state.rank_context(4, 4):
            pass


# -- parallel_model_trace, weight separation and saved directories (no broker: ranks run in threads here) --------


class TinyReference(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(8, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.down(torch.nn.functional.gelu(self.up(self.emb(x)))))


class TinyParallel(torch.nn.Module):
    """The reference with its MLP split Megatron-style and a gathered column-parallel head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(8, 16)  # replicated
        self.up = layers.ColumnParallelLinear(16, 32, gather_output=False)
        self.down = layers.RowParallelLinear(32, 16, input_is_parallel=True)
        self.head = layers.ColumnParallelLinear(16, 8, gather_output=True)

    def forward(self, x):
        return self.head(self.down(torch.nn.functional.gelu(self.up(self.emb(x)))))


@pytest.fixture
def tiny(tmp_path):
    """(reference model, get_model for parallel_model_trace, example input)."""
    torch.manual_seed(7)
    ref = TinyReference().eval()
    ckpt = str(tmp_path / "tiny.pt")
    torch.save({"model": ref.state_dict()}, ckpt)
    calls = []

    def get_model():
        calls.append((parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_size()))
        model = TinyParallel()
        checkpointing.load(ckpt, model, sharded=False)
        return model, {}

    get_model.calls = calls
    return ref, get_model, torch.randn(3, 8)


def run_traced(model, x, tmp_path) -> list:
    """Run every rank of a traced TensorParallelModel in threads (what the workers do), with real collectives."""
    import io

    from worker import weights as wsep

    def rank_fn(rank):
        shard = model.shards[rank]
        module = torch.jit.load(io.BytesIO(shard.data.numpy().tobytes()))
        if shard.weights is not None:
            wsep.restore(module, shard.weights)
        return module(x)

    return run_ranks(model.tp_degree, rank_fn, tmp_path)


@pytest.mark.parametrize("inline", [True, False])
def test_parallel_model_trace_runs_get_model_once_per_rank(tiny, tmp_path, inline):
    from neuron_client.distributed import trace

    ref, get_model, x = tiny
    model = trace.parallel_model_trace(get_model, x, tp_degree=2, inline_weights_to_neff=inline)
    assert get_model.calls == [(0, 2), (1, 2)]
    assert model.tp_degree == 2 and model.state == "unloaded"  # placed on cores at the first call
    assert model.inline_weights is inline
    for rank, shard in enumerate(model.shards):
        assert shard.meta["tp"]["rank"] == rank and shard.meta["tp"]["degree"] == 2
        assert shard.meta["inputs"] == [{"shape": [3, 8], "dtype": "float32"}]
        assert "neuron::all_reduce" in str(torch.jit.load(__import__("io").BytesIO(shard.data.numpy().tobytes()))
                                           .inlined_graph)
    want = ref(x).detach()
    for out in run_traced(model, x, tmp_path):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_separated_graphs_carry_no_weights_and_shared_ones_are_kept_once(tiny):
    import io

    from neuron_client.distributed import trace

    _, get_model, x = tiny
    model = trace.parallel_model_trace(get_model, x, tp_degree=2, inline_weights_to_neff=False)
    for shard in model.shards:
        module = torch.jit.load(io.BytesIO(shard.data.numpy().tobytes()))
        assert all(t.numel() == 0 for t in list(module.parameters()) + list(module.buffers()))
    assert sorted(model.shared_weights) == ["down.bias", "emb.bias", "emb.weight"]
    a, b = (s.weights for s in model.shards)
    assert all(a[k] is b[k] for k in model.shared_weights)  # one tensor in memory for both ranks
    assert not torch.equal(a["up.weight"], b["up.weight"]) and a["up.weight"].shape == (16, 16)
    manifest = model.shards[1].meta["tp"]["weights"]
    assert manifest["emb.weight"] == ["float32", [16, 8], "shared"]
    assert manifest["down.weight"] == ["float32", [16, 16], "rank"]


def test_saved_directory_round_trips_and_bad_directories_are_refused(tiny, tmp_path):
    import shutil

    from neuron_client.distributed import trace
    from neuron_client.wire.errors import ModelLoadError

    ref, get_model, x = tiny
    model = trace.parallel_model_trace(get_model, x, tp_degree=2, inline_weights_to_neff=False)
    d = str(tmp_path / "saved")
    trace.parallel_model_save(model, d)
    assert sorted(os.listdir(d)) == ["tp_0.pt", "tp_1.pt", "weights"]
    assert sorted(os.listdir(os.path.join(d, "weights"))) == ["rank0.pt", "rank1.pt", "shared.pt"]
    assert sorted(torch.load(os.path.join(d, "weights", "shared.pt"), weights_only=True)) == \
        ["down.bias", "emb.bias", "emb.weight"]
    again = trace.read_parallel_model(d)
    assert [s.rank for s in again.shards] == [0, 1]
    want = ref(x).detach()
    for out in run_traced(again, x, tmp_path):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)

    def refused(match):
        with pytest.raises(ModelLoadError, match=match):
            trace.read_parallel_model(d)

    shutil.copy(os.path.join(d, "tp_0.pt"), os.path.join(d, "tp_2.pt"))
    refused("stray rank file tp_2.pt")
    os.rename(os.path.join(d, "tp_2.pt"), os.path.join(d, "tp_x.pt"))
    refused("stray file tp_x.pt")
    os.unlink(os.path.join(d, "tp_x.pt"))
    os.rename(os.path.join(d, "tp_1.pt"), os.path.join(d, "tp_1.bak"))
    refused("missing rank file tp_1.pt")
    shutil.copy(os.path.join(d, "tp_0.pt"), os.path.join(d, "tp_1.pt"))
    refused("tp_1.pt is not rank 1")
    os.replace(os.path.join(d, "tp_1.bak"), os.path.join(d, "tp_1.pt"))
    other = trace.parallel_model_trace(get_model, x, tp_degree=2, inline_weights_to_neff=False)
    trace.parallel_model_save(other, str(tmp_path / "other"))
    shutil.copy(str(tmp_path / "other" / "tp_1.pt"), os.path.join(d, "tp_1.pt"))
    refused("different trace")
    trace.parallel_model_save(model, d)
    os.unlink(os.path.join(d, "weights", "rank1.pt"))
    refused("missing weight file weights/rank1.pt")
    with pytest.raises(ModelLoadError, match="no such directory"):
        trace.read_parallel_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no rank files"):
        trace.read_parallel_model(str(tmp_path))

    inline = trace.parallel_model_trace(get_model, x, tp_degree=1)
    trace.parallel_model_save(inline, d)  # a smaller model saved over a bigger one: the stale files go
    assert sorted(os.listdir(d)) == ["tp_0.pt", "weights"] and os.listdir(os.path.join(d, "weights")) == []
    assert trace.read_parallel_model(d).tp_degree == 1


def test_bucket_config_and_bad_arguments(tiny):
    from neuron_client.distributed import trace

    _, get_model, x = tiny

    def never():
        raise AssertionError("get_model must not run")

    with pytest.raises(ValueError, match="inline_weights_to_neff=False"):
        trace.parallel_model_trace(never, x, tp_degree=2, bucket_config=object())
    with pytest.raises(TypeError, match="bucket_config must be a BucketModelConfig"):
        trace.parallel_model_trace(never, x, tp_degree=2, inline_weights_to_neff=False, bucket_config=object())
    with pytest.raises(ValueError, match="tp_degree"):
        trace.parallel_model_trace(never, x, tp_degree=0)
    with pytest.raises(TypeError, match=r"\(model, io_aliases\)"):
        trace.parallel_model_trace(lambda: TinyParallel(), x, tp_degree=1)
    with pytest.raises(TypeError, match="io_aliases must be a dict"):
        trace.parallel_model_trace(lambda: (TinyParallel(), ["state"]), x, tp_degree=1)


def test_workers_refuse_collectives_without_a_group():
    """In a worker (require_groups), a TP graph loaded without its group fails instead of computing stand-ins."""
    x = torch.ones(2)
    assert torch.equal(collectives.all_reduce(x), x)  # a client: the stand-in
    saved = collectives._standins_allowed
    collectives.require_groups()
    try:
        with pytest.raises(RuntimeError, match="without a process group"):
            collectives.all_reduce(x)
    finally:
        collectives._standins_allowed = saved


def test_load_message_carries_group_and_weights():
    from neuron_client.wire import codec, messages

    w = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    msg = messages.Load(token="t", name="m[tp1/2]", data=torch.zeros(5, dtype=torch.uint8),
                        group=messages.GroupSpec(name="tp2-abc", rank=1, size=2), weights=w)
    back = codec.decode(codec.encode(msg, 7)).msg
    assert back.group == messages.GroupSpec(name="tp2-abc", rank=1, size=2)
    assert sorted(back.weights) == ["a.weight", "b"] and torch.equal(back.weights["a.weight"], w["a.weight"])
    plain = codec.decode(codec.encode(messages.Load(token="t", name="m", data=torch.zeros(1, dtype=torch.uint8))))
    assert plain.msg.group is None and plain.msg.weights is None  # older clients' loads decode as before


@pytest.mark.parametrize("group, match", [
    ({"name": "g", "rank": 0}, "field 'group' is missing field 'size'"),
    ({"name": "g", "rank": True, "size": 2}, r"field 'group.rank' has the wrong type \(bool; expected int\)"),
    ({"name": "g", "rank": 0, "size": 1, "extra": 1}, r"field 'group' has unexpected fields \['extra'\]"),
    (["g", 0, 1], r"field 'group' has the wrong type \(list; expected a map \(GroupSpec\) or null\)"),
])
def test_load_message_with_a_malformed_group_is_refused_by_the_decoder(group, match):
    import msgpack

    from neuron_client.wire import codec
    from neuron_client.wire.errors import ProtocolError

    head = msgpack.packb({"v": 1, "op": "load", "body": {"token": "t", "name": "m", "data": 0, "group": group}})
    with pytest.raises(ProtocolError, match=match):
        codec.decode([head])


def test_model_store_restores_weights_joins_and_drops_groups(tiny, tmp_path):
    """The worker side in-process: a weight-less rank graph plus its weights, a (one-rank) group, unload."""
    from neuron_client.distributed import trace
    from neuron_client.wire.errors import ModelLoadError, ProtocolError
    from neuron_client.wire.messages import GroupSpec
    from worker.store import ModelStore

    ref, get_model, x = tiny
    model = trace.parallel_model_trace(get_model, x, tp_degree=1, inline_weights_to_neff=False)
    shard = model.shards[0]
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    store = ModelStore(0, "cpu", rendezvous_dir=str(rendezvous))
    blob = shard.data.numpy().tobytes()
    model_id, _ = store.load("tiny", blob, weights=shard.weights, group=GroupSpec(name="g1", rank=0, size=1))
    entry = store.get(model_id)
    assert entry.group is not None and collectives.registered() == ["g1"]
    assert not os.listdir(rendezvous)  # the rendezvous file is gone once every rank joined
    with torch.inference_mode(), collectives.active(entry.group):
        torch.testing.assert_close(entry.module(x), ref(x).detach(), atol=1e-5, rtol=1e-5)
    store.unload(model_id)
    assert collectives.registered() == []
    for bad in (GroupSpec(name="../x", rank=0, size=1), GroupSpec(name="g", rank=1, size=1),
                GroupSpec(name="g", rank=0, size=0), {"name": "g", "rank": 0, "size": 1}):  # values; not a GroupSpec
        with pytest.raises(ProtocolError, match="'group'"):
            store.load("tiny", blob, weights=shard.weights, group=bad)
    with pytest.raises(ModelLoadError, match="missing"):
        store.load("tiny", blob, weights={k: v for k, v in shard.weights.items() if k != "emb.weight"})
