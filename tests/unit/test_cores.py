"""Unit tests of neuron_client.cores: NEURON_RT_VISIBLE_CORES / NEURON_RT_NUM_CORES parsing and core-range printing."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from neuron_client.wire.cores import (MAX_CORES, CoreRequest, format_cores, format_visible, parse_num_cores,
                                      parse_visible_cores, request_from_env)
from neuron_client.wire.errors import NeuronCoreSpecError

core_sets = st.sets(st.integers(0, 300), min_size=1, max_size=40)
spaces = st.sampled_from(["", " ", "  ", "\t"])


def runs(cores):
    """Maximal runs of consecutive indices, as (lo, hi) pairs."""
    out = []
    for c in sorted(cores):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [tuple(r) for r in out]


@st.composite
def written_forms(draw):
    """A core set and one of the many valid ways of writing it: runs split anywhere, written as ranges or
    singletons, items in any order, spaces around numbers, dashes and commas."""
    cores = draw(core_sets)
    pieces = []
    for lo, hi in runs(cores):
        start = lo
        while start <= hi:
            end = draw(st.integers(start, hi))
            pieces.append((start, end))
            start = end + 1
    items = []
    for lo, hi in draw(st.permutations(pieces)):
        if lo == hi and draw(st.booleans()):
            items.append(f"{draw(spaces)}{lo}{draw(spaces)}")
        else:
            items.append(f"{draw(spaces)}{lo}{draw(spaces)}-{draw(spaces)}{hi}{draw(spaces)}")
    return cores, ",".join(items)


# ----------------------------------------------------------------------------------------------------------------
# parse_visible_cores


@pytest.mark.parametrize("text, expected", [
    ("3", [3]),
    ("0", [0]),
    ("4-5", [4, 5]),
    ("7-7", [7]),
    ("0,2,4-5", [0, 2, 4, 5]),
    ("12-23", list(range(12, 24))),
    (" 0 , 2 , 4 - 5 ", [0, 2, 4, 5]),
    ("4-5,0", [0, 4, 5]),
    ("0,1,2", [0, 1, 2]),  # Ray's comma lists
    ("007", [7]),
])
def test_parse_visible_cores_examples(text, expected):
    assert parse_visible_cores(text) == expected


@settings(max_examples=200, deadline=None)
@given(core_sets)
def test_format_visible_then_parse_round_trips(cores):
    text = format_visible(cores)
    assert parse_visible_cores(text) == sorted(cores)
    assert "nc" not in text


@settings(max_examples=200, deadline=None)
@given(written_forms())
def test_every_valid_form_parses(form):
    cores, text = form
    assert parse_visible_cores(text) == sorted(cores)


@pytest.mark.parametrize("text", [
    "4-2", "-1", "x", "", "   ", "1,,2", "1-", ",1", "1,", "1-2-3", "1.5", "0x3", "+3", "1 2", "nc1", "3-",
    "1,1", "0-2,2", "0-3,2-5", "5,4-6", "1, 1",
])
def test_parse_visible_cores_rejects_malformed(text):
    with pytest.raises(NeuronCoreSpecError) as info:
        parse_visible_cores(text)
    assert isinstance(info.value, ValueError)
    assert "NEURON_RT_VISIBLE_CORES" in str(info.value)


def test_parse_visible_cores_rejects_none():
    with pytest.raises(NeuronCoreSpecError):
        parse_visible_cores(None)


def test_backwards_range_message_suggests_the_fix():
    with pytest.raises(NeuronCoreSpecError, match="runs backwards; write it as 2-4"):
        parse_visible_cores("4-2")


@settings(max_examples=100, deadline=None)
@given(form=written_forms(), data=st.data())
def test_any_repeated_core_is_rejected(form, data):
    cores, text = form
    dup = data.draw(st.sampled_from(sorted(cores)))
    extra = data.draw(st.sampled_from([f"{dup}", f"{dup}-{dup}", f"{max(0, dup - 1)}-{dup + 1}"]))
    with pytest.raises(NeuronCoreSpecError, match="more than once"):
        parse_visible_cores(f"{text},{extra}" if data.draw(st.booleans()) else f"{extra},{text}")


@settings(max_examples=100, deadline=None)
@given(form=written_forms(), junk=st.sampled_from(["", "x", "-", "-1", "1-", "a-b", "3-1", "1..2"]), data=st.data())
def test_one_bad_item_spoils_the_list(form, junk, data):
    _, text = form
    items = text.split(",")
    items.insert(data.draw(st.integers(0, len(items))), junk)
    with pytest.raises(NeuronCoreSpecError):
        parse_visible_cores(",".join(items))


# ----------------------------------------------------------------------------------------------------------------
# parse_num_cores


@pytest.mark.parametrize("text, expected", [("0", 0), ("1", 1), ("16", 16), (" 2 ", 2), ("02", 2)])
def test_parse_num_cores(text, expected):
    assert parse_num_cores(text) == expected


@pytest.mark.parametrize("text", ["-1", "-0x1", "x", "", "  ", "1.5", "2.0", "one", "1-2", "0,1"])
def test_parse_num_cores_rejects(text):
    with pytest.raises(NeuronCoreSpecError) as info:
        parse_num_cores(text)
    assert isinstance(info.value, ValueError)
    assert "NEURON_RT_NUM_CORES" in str(info.value)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, MAX_CORES))
def test_parse_num_cores_any_count(n):
    assert parse_num_cores(str(n)) == n


@settings(max_examples=50, deadline=None)
@given(st.integers(-10**6, -1))
def test_parse_num_cores_negative(n):
    with pytest.raises(NeuronCoreSpecError, match="negative"):
        parse_num_cores(str(n))


# ----------------------------------------------------------------------------------------------------------------
# format_cores / format_visible


@pytest.mark.parametrize("cores, text", [
    ([0, 1, 2, 3, 6, 7], "nc0-nc3,nc6-nc7"),
    ([], "0"),
    ([1], "nc1"),  # a single core prints without a range
    ([5, 3, 4], "nc3-nc5"),
    ([0, 2, 4], "nc0,nc2,nc4"),
    ([1, 1, 2], "nc1-nc2"),
    ((7, 9, 8, 12), "nc7-nc9,nc12"),
])
def test_format_cores_examples(cores, text):
    assert format_cores(cores) == text


@pytest.mark.parametrize("cores, text", [([4, 5, 7], "4-5,7"), ([], ""), ([3], "3"), ([0, 1, 2, 3, 6, 7], "0-3,6-7")])
def test_format_visible_examples(cores, text):
    assert format_visible(cores) == text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=40))
def test_format_cores_round_trips_through_parse(cores):
    text = format_cores(cores)
    if not cores:
        assert text == "0"
        return
    assert parse_visible_cores(text.replace("nc", "")) == sorted(set(cores))
    # one item per maximal run: ranges never touch
    assert len(text.split(",")) == len(runs(set(cores)))


# ----------------------------------------------------------------------------------------------------------------
# CoreRequest / request_from_env


def test_describe():
    assert CoreRequest(visible=(1,)).describe() == "nc1"
    assert CoreRequest(visible=(4, 5)).describe() == "nc4-nc5"
    assert CoreRequest(count=2).describe() == "2 contiguous NeuronCore(s)"
    assert CoreRequest().describe() == "all NeuronCores"


@pytest.mark.parametrize("env, expected", [
    ({}, CoreRequest()),
    ({"NEURON_RT_VISIBLE_CORES": "4-5"}, CoreRequest(visible=(4, 5))),
    ({"NEURON_RT_VISIBLE_CORES": "0,2,4-5"}, CoreRequest(visible=(0, 2, 4, 5))),
    ({"NEURON_RT_NUM_CORES": "2"}, CoreRequest(count=2)),
    ({"NEURON_RT_NUM_CORES": "0"}, CoreRequest()),  # 0 means all
    ({"NEURON_RT_VISIBLE_CORES": "3", "NEURON_RT_NUM_CORES": "2"}, CoreRequest(visible=(3,))),  # VISIBLE wins
    ({"NEURON_RT_VISIBLE_CORES": "1", "NEURON_RT_NUM_CORES": "bogus"}, CoreRequest(visible=(1,))),
    ({"NEURON_RT_VISIBLE_CORES": "", "NEURON_RT_NUM_CORES": "2"}, CoreRequest(count=2)),  # empty = unset
    ({"NEURON_RT_VISIBLE_CORES": "  ", "NEURON_RT_NUM_CORES": " "}, CoreRequest()),
    ({"OTHER": "1"}, CoreRequest()),
])
def test_request_from_env(env, expected):
    assert request_from_env(env) == expected


@pytest.mark.parametrize("env", [
    {"NEURON_RT_VISIBLE_CORES": "4-2"},
    {"NEURON_RT_VISIBLE_CORES": "1,1", "NEURON_RT_NUM_CORES": "2"},
    {"NEURON_RT_NUM_CORES": "-1"},
    {"NEURON_RT_NUM_CORES": "two"},
])
def test_request_from_env_rejects_bad_values(env):
    with pytest.raises(NeuronCoreSpecError):
        request_from_env(env)


@settings(max_examples=100, deadline=None)
@given(form=written_forms(), num=st.none() | st.integers(0, 64).map(str))
def test_request_from_env_visible_always_wins(form, num):
    cores, text = form
    env = {"NEURON_RT_VISIBLE_CORES": text}
    if num is not None:
        env["NEURON_RT_NUM_CORES"] = num
    assert request_from_env(env) == CoreRequest(visible=tuple(sorted(cores)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64))
def test_request_from_env_num(n):
    assert request_from_env({"NEURON_RT_NUM_CORES": str(n)}) == CoreRequest(count=n)
