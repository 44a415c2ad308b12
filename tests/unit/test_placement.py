"""Unit tests of neuron_client.placement: resolve() rules, validation messages, per-thread contexts."""
from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings, strategies as st

from neuron_client.runtime import placement
from neuron_client.runtime.placement import (ALL, Placement, current, multicore_context, neuron_cores_context, resolve,
                                             validate_count, validate_start)

loads = st.lists(st.integers(0, 5), min_size=1, max_size=16)


# ----------------------------------------------------------------------------------------------------------------
# resolve


def test_default_places_linearly_on_the_least_used_core():
    load = [0, 0, 0, 0]
    placed = []
    for _ in range(6):
        cores = resolve(Placement(), load)
        assert len(cores) == 1
        placed.append(cores[0])
        load[cores[0]] += 1
    assert placed == [0, 1, 2, 3, 0, 1]  # m0 on nc0, m1 on nc1, ...


@settings(max_examples=150, deadline=None)
@given(load=loads)
def test_default_is_the_lowest_index_among_the_least_used(load):
    assert resolve(Placement(), load) == [load.index(min(load))]


@settings(max_examples=150, deadline=None)
@given(load=loads, data=st.data())
def test_count_with_least_used_start_picks_the_lightest_window(load, data):
    n = len(load)
    count = data.draw(st.integers(1, n))
    got = resolve(Placement(-1, count), load)
    assert len(got) == count and got == list(range(got[0], got[0] + count))
    sums = [sum(load[s:s + count]) for s in range(n - count + 1)]
    assert got[0] == sums.index(min(sums))


@settings(max_examples=150, deadline=None)
@given(load=loads, data=st.data())
def test_explicit_start_and_count(load, data):
    n = len(load)
    start = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - start))
    assert resolve(Placement(start, count), load) == list(range(start, start + count))
    assert resolve(Placement(start, -1), load) == [start]  # nc_count=-1: one core


def test_seed_manual_selection_example():
    load = [0, 0, 0, 0]
    m0 = resolve(Placement(3, -1), load)
    m1 = resolve(Placement(0, 2), load)
    assert m0 == [3] and m1 == [0, 1]


def test_all_means_every_core():
    assert resolve(Placement(0, ALL), [3, 1, 2]) == [0, 1, 2]
    assert resolve(Placement(-1, ALL), [3, 1, 2]) == [0, 1, 2]


@pytest.mark.parametrize("count", [0])
def test_count_zero_message(count):
    with pytest.raises(ValueError) as info:
        resolve(Placement(-1, count), [0, 0])
    assert str(info.value) == "Cannot be set to 0"


@pytest.mark.parametrize("count", [-2, -3, -100])
def test_count_below_minus_one_message(count):
    with pytest.raises(ValueError) as info:
        resolve(Placement(-1, count), [0, 0])
    assert str(info.value) == "Values less than -1 are invalid"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 16), extra=st.integers(1, 20))
def test_count_above_owned_message(n, extra):
    with pytest.raises(ValueError) as info:
        resolve(Placement(-1, n + extra), [0] * n)
    message = str(info.value)  # the reference's words first, then what was asked and what this process owns
    assert message.startswith(f"NeuronCores available: {n} (nc_count={n + extra} ")
    assert f"nc0-nc{n - 1}" in message and f"NEURON_RT_NUM_CORES={n + extra}" in message


def test_start_plus_count_past_the_end():
    with pytest.raises(ValueError, match=r"NeuronCores available: 4") as info:
        resolve(Placement(3, 2), [0] * 4)
    assert "nc3-nc4" in str(info.value)


@pytest.mark.parametrize("start", [4, 5, 100])
def test_start_past_the_owned_cores(start):
    with pytest.raises(ValueError, match="NeuronCores available: 4"):
        resolve(Placement(start, -1), [0] * 4)


@pytest.mark.parametrize("start", [-2, -10])
def test_start_below_minus_one(start):
    with pytest.raises(ValueError, match=f"start_nc={start} is invalid"):
        resolve(Placement(start, -1), [0] * 4)


@pytest.mark.parametrize("bad", [1.0, "1", None, True, False])
def test_non_int_values_are_type_errors(bad):
    with pytest.raises(TypeError):
        validate_count(bad, 4)
    with pytest.raises(TypeError):
        validate_start(bad, 4)


def test_validate_count_accepts():
    for count in (-1, 1, 4, ALL):
        validate_count(count, 4)


# ----------------------------------------------------------------------------------------------------------------
# contexts


def test_default_current():
    assert current() == Placement(-1, -1)


def test_context_sets_and_restores():
    with neuron_cores_context(start_nc=2, nc_count=2):
        assert current() == Placement(2, 2)
        with multicore_context():
            assert current() == Placement(0, ALL)
            with neuron_cores_context():
                assert current() == Placement(-1, -1)
            assert current() == Placement(0, ALL)
        assert current() == Placement(2, 2)
    assert current() == Placement()


def test_context_restores_after_an_exception():
    with pytest.raises(KeyError):
        with neuron_cores_context(1, 1):
            raise KeyError("boom")
    assert current() == Placement()


@pytest.mark.parametrize("kwargs, message", [
    ({"nc_count": 0}, "Cannot be set to 0"),
    ({"nc_count": -2}, "Values less than -1 are invalid"),
])
def test_context_validates_at_creation(kwargs, message):
    with pytest.raises(ValueError) as info:
        neuron_cores_context(**kwargs)
    assert str(info.value) == message
    assert current() == Placement()


def test_context_rejects_bad_start_at_creation():
    with pytest.raises(ValueError, match="start_nc=-5"):
        neuron_cores_context(start_nc=-5)
    with pytest.raises(TypeError):
        neuron_cores_context(start_nc="0")


def test_context_accepts_a_count_checked_only_at_load():
    # The owned count is unknown when the context is entered: a large count is checked when a model loads.
    with neuron_cores_context(0, 64):
        assert current() == Placement(0, 64)
        with pytest.raises(ValueError, match="NeuronCores available: 8"):
            resolve(current(), [0] * 8)


def test_contexts_are_per_thread():
    """Two threads, each inside its own context at the same time, see their own current()."""
    both_inside = threading.Barrier(3)
    checked = threading.Barrier(3)
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def worker(name, ctx):
        try:
            seen[name + "-before"] = current()
            with ctx:
                both_inside.wait(timeout=10)
                seen[name] = current()
                checked.wait(timeout=10)
            seen[name + "-after"] = current()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            both_inside.abort()
            checked.abort()

    with neuron_cores_context(1, 1):  # the main thread's own setting is invisible to the others
        threads = [threading.Thread(target=worker, args=("a", neuron_cores_context(3, -1))),
                   threading.Thread(target=worker, args=("b", multicore_context()))]
        for t in threads:
            t.start()
        both_inside.wait(timeout=10)
        main_inside = current()
        checked.wait(timeout=10)
        for t in threads:
            t.join(timeout=10)
        assert current() == Placement(1, 1)
    assert not errors, errors
    assert main_inside == Placement(1, 1)
    assert seen["a"] == Placement(3, -1)
    assert seen["b"] == Placement(0, ALL)
    for name in ("a", "b"):
        assert seen[name + "-before"] == Placement()
        assert seen[name + "-after"] == Placement()
    assert current() == Placement()


def test_many_threads_nest_independently():
    n = 8
    start = threading.Barrier(n)
    results: dict[int, list] = {}

    def worker(i):
        got = []
        with neuron_cores_context(i, -1):
            start.wait(timeout=10)
            got.append(current())
            with neuron_cores_context(-1, i + 1):
                got.append(current())
            got.append(current())
        got.append(current())
        results[i] = got

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for i in range(n):
        assert results[i] == [Placement(i, -1), Placement(-1, i + 1), Placement(i, -1), Placement()]


def test_thread_local_state_is_module_private():
    assert isinstance(placement._local, threading.local)
