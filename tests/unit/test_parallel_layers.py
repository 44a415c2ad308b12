"""Tensor-parallel layers against torch.nn.Linear on random weights, every rank simulated in this process: one
thread per rank, each in its own ``parallel_state.rank_context``, with real gloo collectives between the threads."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from neuron_client.distributed import collectives
from neuron_client.distributed.parallel_layers import checkpointing, layers, mappings, parallel_state


def run_ranks(size: int, fn, tmp_path, timeout_s: float = 60.0) -> list:
    """``fn(rank)`` in ``size`` threads, each a rank of a gloo group; their results in rank order."""
    store = str(tmp_path / f"store-{size}-{os.urandom(4).hex()}")
    results, errors = [None] * size, []

    def rank_main(rank: int) -> None:
        group = None
        try:
            group = collectives.form_group(f"test{size}", rank, size, store, timeout_s=timeout_s)
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
