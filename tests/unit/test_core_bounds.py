"""Core specs are bounded before they are expanded (#20): huge ranges, huge numbers and booleans are refused at once
with a NeuronCoreSpecError that says what was asked, the limit and a valid example."""
from __future__ import annotations

import contextlib
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from neuron_client.wire.cores import (MAX_CORES, CoreRequest, format_cores, parse_num_cores, parse_visible_cores,
                                      request_from_env)
from neuron_client.wire.errors import NeuronCoreSpecError

# Parsing is bounded before anything is expanded: at most MAX_CORES ints (a few hundred KiB). Unbounded,
# 0-10000000 took 13 s and 1 GB. Memory, unlike time, is measured exactly on a loaded machine.
BOUND_BYTES = 2 << 20


@contextlib.contextmanager
def bounded(what: str):
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < BOUND_BYTES, f"parsing {what[:40]!r} allocated {peak} bytes at its peak"


def refused(parse, text) -> str:
    with bounded(text), pytest.raises(NeuronCoreSpecError) as info:
        parse(text)
    return str(info.value)


@pytest.mark.parametrize("text, asked", [
    ("0-10000000", "10000000"),
    (f"0-{MAX_CORES}", str(MAX_CORES)),
    (str(MAX_CORES), str(MAX_CORES)),
    ("999999", "999999"),
    ("1,2,5000-5001", "5000"),
    ("4095-99999999999999999999", "99999999999"),
    ("9" * 5000, "999999999999..."),  # int() alone would raise ValueError (over 4300 digits)
    ("0-" + "9" * 50000, "999999999999..."),
])
def test_huge_visible_cores_are_refused_at_once(text, asked):
    message = refused(parse_visible_cores, text)
    assert "NEURON_RT_VISIBLE_CORES=" in message and f"core {asked}" in message
    assert f"at most {MAX_CORES} cores" in message and "'4-5'" in message
    assert len(message) < 400  # the spec is cut short, not echoed whole


def test_the_last_possible_core_parses():
    assert parse_visible_cores(f"{MAX_CORES - 1}") == [MAX_CORES - 1]
    assert parse_visible_cores(f"0-{MAX_CORES - 1}") == list(range(MAX_CORES))
    assert parse_visible_cores("0000000000003") == [3]  # leading zeros are not digits that count


def test_thousands_of_leading_zeros_are_not_too_many_digits():
    zeros = "0" * 5000  # int() refuses strings over 4300 digits, leading zeros included
    assert parse_visible_cores(f"{zeros}1-{zeros}2") == [1, 2]
    assert parse_num_cores(f"{zeros}3") == 3


def test_every_core_listed_one_by_one_parses():
    text = " , ".join(map(str, range(MAX_CORES)))
    assert parse_visible_cores(text) == list(range(MAX_CORES))


@pytest.mark.parametrize("text", [",".join(["0"] * 200000)[:60000], ",".join(["0-4095"] * 10000)[:60000],
                                  "0," * 40000, " " * 100000 + "1"])
def test_long_lists_are_refused_fast(text):
    refused(parse_visible_cores, text)


@pytest.mark.parametrize("text", [str(MAX_CORES + 1), "10000000", "9" * 5000, "1" + "0" * 30])
def test_huge_counts_are_refused(text):
    message = refused(parse_num_cores, text)
    assert "NEURON_RT_NUM_CORES=" in message and f"at most {MAX_CORES}" in message and "'2'" in message


def test_the_largest_count_parses():
    assert parse_num_cores(str(MAX_CORES)) == MAX_CORES
    assert parse_num_cores("-0") == 0


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_never_indices_or_counts(value):
    with pytest.raises(NeuronCoreSpecError):
        parse_visible_cores(value)
    with pytest.raises(NeuronCoreSpecError):
        parse_num_cores(value)
    with pytest.raises(NeuronCoreSpecError, match="boolean"):
        CoreRequest(visible=(0, value))
    with pytest.raises(NeuronCoreSpecError, match="boolean"):
        CoreRequest(count=value)
    with pytest.raises(NeuronCoreSpecError, match="boolean"):
        format_cores([1, value])
    with pytest.raises(NeuronCoreSpecError):
        request_from_env({"NEURON_RT_NUM_CORES": value})
    with pytest.raises(NeuronCoreSpecError):
        request_from_env({"NEURON_RT_VISIBLE_CORES": value})


def test_core_request_takes_integers_only():
    assert CoreRequest(visible=[2, 3]).visible == (2, 3)
    with pytest.raises(NeuronCoreSpecError):
        CoreRequest(visible=(1.0,))
    with pytest.raises(NeuronCoreSpecError):
        CoreRequest(count="2")


def test_a_huge_range_prints_without_expanding():
    assert format_cores(range(0, 10**12)) == f"nc0-nc{10**12 - 1}"
    assert format_cores(range(3, 4)) == "nc3" and format_cores(range(0)) == "0"


padded_numbers = st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(0, 6000), st.integers(0, 10**9))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200) | st.text(alphabet="0123456789-, \t", max_size=200)
       | st.lists(padded_numbers, min_size=1, max_size=3).map("-".join))
def test_parse_raises_nothing_but_spec_errors(text):
    from_visible = lambda t: request_from_env({"NEURON_RT_VISIBLE_CORES": t})  # noqa: E731
    from_num = lambda t: request_from_env({"NEURON_RT_NUM_CORES": t})  # noqa: E731
    for parse in (parse_visible_cores, parse_num_cores, from_visible, from_num):
        with bounded(text):
            try:
                parse(text)
            except NeuronCoreSpecError:
                pass


@settings(max_examples=300, deadline=None)
@given(lo=st.integers(0, 10**40), width=st.integers(0, 10**40), sep=st.sampled_from(["-", " - "]))
def test_any_range_is_bounded_fast(lo, width, sep):
    text = f"{lo}{sep}{lo + width}"
    with bounded(text):
        try:
            cores = parse_visible_cores(text)
        except NeuronCoreSpecError as exc:
            cores = exc
    if isinstance(cores, NeuronCoreSpecError):
        assert lo + width >= MAX_CORES, cores
    else:
        assert cores == list(range(lo, lo + width + 1)) and lo + width < MAX_CORES


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**30, 10**30))
def test_any_count_is_bounded(n):
    try:
        assert parse_num_cores(str(n)) == n and 0 <= n <= MAX_CORES
    except NeuronCoreSpecError:
        assert not 0 <= n <= MAX_CORES
