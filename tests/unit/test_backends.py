"""Unit tests of worker.backends.cpus_for_core: how a core's worker is pinned to host CPUs."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from broker.backends import CpuBackend, cpus_for_core, host_cpus

cpu_lists = st.sets(st.integers(0, 255), min_size=1, max_size=64).map(sorted)


@settings(max_examples=200, deadline=None)
@given(cpus=cpu_lists, data=st.data())
def test_enough_cpus_gives_an_even_disjoint_split(cpus, data):
    n_cores = data.draw(st.integers(1, len(cpus)))
    parts = [cpus_for_core(c, n_cores, cpus) for c in range(n_cores)]
    assert all(parts), "every core gets at least one CPU"
    flat = [cpu for part in parts for cpu in part]
    assert flat == cpus, "the parts are disjoint, in order, and together cover every CPU"
    sizes = {len(p) for p in parts}
    assert max(sizes) - min(sizes) <= 1, f"uneven split {sizes}"
    for part in parts:  # each part is a contiguous slice of the CPU list
        i = cpus.index(part[0])
        assert cpus[i:i + len(part)] == part


@settings(max_examples=200, deadline=None)
@given(cpus=cpu_lists, data=st.data())
def test_more_cores_than_cpus_share_round_robin(cpus, data):
    n_cores = data.draw(st.integers(len(cpus) + 1, 4 * len(cpus) + 8))
    parts = [cpus_for_core(c, n_cores, cpus) for c in range(n_cores)]
    assert all(len(p) == 1 for p in parts), "one CPU per core"
    assert [p[0] for p in parts] == [cpus[c % len(cpus)] for c in range(n_cores)]
    use = Counter(p[0] for p in parts)
    assert set(use) == set(cpus), "every CPU is used"
    assert max(use.values()) - min(use.values()) <= 1


@pytest.mark.parametrize("core, n_cores, cpus, expected", [
    (0, 1, [0, 1, 2, 3], [0, 1, 2, 3]),
    (0, 2, [0, 1, 2, 3], [0, 1]),
    (1, 2, [0, 1, 2, 3], [2, 3]),
    (0, 3, [0, 1, 2, 3], [0]),
    (1, 3, [0, 1, 2, 3], [1]),
    (2, 3, [0, 1, 2, 3], [2, 3]),
    (3, 4, [4, 5, 6, 7], [7]),
    (0, 2, [3], [3]),
    (1, 2, [3], [3]),
    (4, 8, [0, 1], [0]),
    (5, 8, [0, 1], [1]),
    (7, 8, [10, 12, 14], [12]),
])
def test_examples(core, n_cores, cpus, expected):
    assert cpus_for_core(core, n_cores, cpus) == expected


def test_two_cpus_eight_cores_like_a_small_ci_host():
    assert [cpus_for_core(c, 8, [0, 1]) for c in range(8)] == [[0], [1]] * 4


def test_cpu_backend_placement_uses_the_split():
    b = CpuBackend(n_cores=2, cpus=[0, 1, 2, 3])
    assert b.placement(0) == {"device": "cpu", "cpus": [0, 1], "intra_op_threads": 2, "inter_op_threads": 2}
    assert b.placement(1) == {"device": "cpu", "cpus": [2, 3], "intra_op_threads": 2, "inter_op_threads": 2}


def test_thread_pools_default_to_the_core_cpus_and_can_be_set():
    from broker.backends import Threads

    b = CpuBackend(n_cores=1, cpus=[0, 1, 2, 3], threads=Threads(intra=1))
    assert b.placement(0)["intra_op_threads"] == 1 and b.placement(0)["inter_op_threads"] == 4


def test_host_cpus_is_a_sorted_nonempty_list():
    cpus = host_cpus()
    assert cpus and cpus == sorted(set(cpus))
