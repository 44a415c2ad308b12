"""The lifecycle every placed model shares (neuron_client.models.placed), in-process: no broker needed."""
from __future__ import annotations

import gc

import pytest
import torch

from neuron_client.models.placed import TRANSITIONS, LoadState, PlacedModel
from neuron_client.wire.errors import InputShapeError


class FakeRuntime:
    """Only what PlacedModel touches of a runtime: the per-core tally and the background unload."""

    def __init__(self, n: int):
        self.models_per_core = [0] * n
        self.unloaded: list = []

    def unload_later(self, placed) -> None:
        self.unloaded.append(placed)


class Model(PlacedModel):
    def __init__(self, specs=None):
        super().__init__("m")
        self.specs = specs

    @property
    def input_specs(self):
        return self.specs


def test_every_state_is_in_the_table_and_the_table_allows_only_its_moves():
    assert set(TRANSITIONS) == set(LoadState)
    m = Model()
    assert m.state == "unloaded" and m.state is LoadState.UNLOADED
    with pytest.raises(RuntimeError, match="cannot go from unloaded to loaded"):
        m._to(LoadState.LOADED)
    m.defer()
    assert m.state == "lazy"
    m._to(LoadState.LOADING)
    m._to(LoadState.FAILED)
    with pytest.raises(RuntimeError, match="from failed to lazy"):
        m.defer()
    m._to(LoadState.LOADING)
    m._to(LoadState.LOADED)
    m._to(LoadState.LOADED)  # staying is allowed
    with pytest.raises(RuntimeError, match="allowed: unloaded"):
        m._to(LoadState.LOADING)


def test_state_cannot_be_set_from_outside():
    with pytest.raises(AttributeError):
        Model().state = "lazy"


def test_the_tally_counts_each_core_once_and_is_given_back():
    rt = FakeRuntime(3)
    m = Model()
    m._hold(rt, [0, 2])
    m._hold(rt, [1, 2])  # a new placement replaces the old
    assert rt.models_per_core == [0, 1, 1]
    m._unhold()
    m._unhold()
    assert rt.models_per_core == [0, 0, 0]


def test_a_collected_model_unloads_in_the_background_and_an_untracked_one_does_not():
    rt = FakeRuntime(1)
    m = Model()
    m._track(rt, [(0, 7)])
    del m
    gc.collect()
    assert rt.unloaded == [[(0, 7)]]
    m = Model()
    m._track(rt, [(0, 8)])
    m._untrack()
    del m
    gc.collect()
    assert rt.unloaded == [[(0, 7)]]


def test_shape_check_names_what_was_traced_and_what_came():
    m = Model([{"shape": [2, 3], "dtype": "float32"}])
    m.check_shapes((torch.zeros(2, 3),))
    with pytest.raises(InputShapeError, match=r"traced for inputs \(float32\[2, 3\]\) but got \(float64\[2, 3\]\)"):
        m.check_shapes((torch.zeros(2, 3, dtype=torch.float64),))
    with pytest.raises(InputShapeError, match=r"but got \(none\)"):
        m.check_shapes(())
    m.static_shapes = False
    m.check_shapes((torch.zeros(5),))
    Model(None).check_shapes((torch.zeros(5),))  # nothing recorded: nothing checked
