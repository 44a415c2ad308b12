"""Unit tests of broker.allocator: the core table (who owns which core), checked against a simple model."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.allocator import CoreAllocator, Denied
from neuron_client.wire.cores import CoreRequest
from neuron_client.wire.errors import NeuronCoreSpecError

OWNERS = [f"lease-{i}" for i in range(6)]


def request_strategy(n: int):
    """A valid request on an ``n``-core host: all cores, a contiguous count, or exact (sorted, distinct) cores."""
    visible = st.sets(st.integers(0, n - 1), min_size=1).map(lambda s: CoreRequest(visible=tuple(sorted(s))))
    count = st.integers(1, n).map(lambda k: CoreRequest(count=k))
    return st.one_of(st.just(CoreRequest()), count, visible)


def first_fit(n: int, count: int, usable) -> list[int] | None:
    """Reference first fit: the lowest start whose ``count`` cores are all usable."""
    for start in range(n - count + 1):
        window = range(start, start + count)
        if all(usable(c) for c in window):
            return list(window)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Stateful model check.


class AllocatorMachine(RuleBasedStateMachine):
    """Random grant / release / mark_failed / mark_healthy sequences against a dict model of the table."""

    @initialize(n=st.integers(1, 16))
    def start(self, n):
        self.n = n
        self.alloc = CoreAllocator(n)
        self.model: dict[int, str] = {}  # core -> owner
        self.failed: set[int] = set()

    def usable(self, c: int) -> bool:
        return c not in self.model and c not in self.failed

    def cores_of(self, owner: str) -> list[int]:
        return sorted(c for c, o in self.model.items() if o == owner)

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def grant(self, owner, data):
        req = data.draw(request_strategy(self.n), label="request")
        before = list(self.alloc.owner)
        if self.cores_of(owner):
            with pytest.raises(ValueError):
                self.alloc.grant(req, owner)
            assert self.alloc.owner == before, "a refused grant must change nothing"
            return

        if req.visible is not None:
            wanted = list(req.visible)
        elif req.count is None:
            wanted = list(range(self.n))
        else:
            wanted = first_fit(self.n, req.count, self.usable)
        ok = wanted is not None and all(self.usable(c) for c in wanted)

        got = self.alloc.grant(req, owner)
        if ok:
            assert got == wanted
            assert not isinstance(got, Denied)
            assert not set(got) & self.failed, "a failed core was granted"
            for c in got:
                assert c not in self.model, f"core {c} would get a second owner"
                self.model[c] = owner
        else:
            assert isinstance(got, Denied)
            assert self.alloc.owner == before, "a denied grant must be all-or-nothing (nothing taken)"
            self.check_denied(req, got)

    def check_denied(self, req: CoreRequest, d: Denied) -> None:
        if req.visible is not None or req.count is None:
            wanted = list(req.visible) if req.visible is not None else list(range(self.n))
            assert d.requested == wanted
            assert d.busy == {c: self.model[c] for c in wanted if c in self.model}
            assert d.failed == [c for c in wanted if c in self.failed]
            assert d.could_succeed_later == (not any(c in self.failed for c in wanted))
        else:
            assert d.requested is None
            assert d.busy == dict(self.model)
            assert d.failed == sorted(self.failed)
            # Waiting helps iff some window of `count` cores contains no failed core.
            possible = first_fit(self.n, req.count, lambda c: c not in self.failed) is not None
            assert d.could_succeed_later == possible

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner):
        expected = self.cores_of(owner)
        others = {c: o for c, o in self.model.items() if o != owner}
        assert self.alloc.release(owner) == expected
        self.model = others
        assert self.alloc.cores_of(owner) == []

    @rule(data=st.data())
    def mark_failed(self, data):
        core = data.draw(st.integers(0, self.n - 1), label="core")
        self.alloc.mark_failed(core)
        self.failed.add(core)

    @precondition(lambda self: getattr(self, "failed", None))
    @rule(data=st.data())
    def mark_healthy(self, data):
        core = data.draw(st.sampled_from(sorted(self.failed)), label="core")
        self.alloc.mark_healthy(core)
        self.failed.discard(core)

    @invariant()
    def table_matches_model(self):
        if not hasattr(self, "alloc"):
            return
        assert self.alloc.owner == [self.model.get(c) for c in range(self.n)]
        assert self.alloc.failed == self.failed
        assert self.alloc.free_cores() == [c for c in range(self.n) if self.usable(c)]
        seen: dict[int, str] = {}
        for owner in OWNERS:
            for c in self.alloc.cores_of(owner):
                assert c not in seen, f"core {c} owned by both {seen[c]} and {owner}"
                seen[c] = owner
                assert self.alloc.owner_of(c) == owner


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestAllocatorStateMachine = AllocatorMachine.TestCase


# ----------------------------------------------------------------------------------------------------------------
# Properties and examples.


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 16), data=st.data())
def test_count_grant_is_first_fit_and_contiguous(n, data):
    alloc = CoreAllocator(n)
    busy = data.draw(st.sets(st.integers(0, n - 1)), label="busy")
    failed = data.draw(st.sets(st.integers(0, n - 1)), label="failed")
    for c in busy:
        alloc.owner[c] = "other"
    for c in failed:
        alloc.mark_failed(c)
    count = data.draw(st.integers(1, n), label="count")
    got = alloc.grant(CoreRequest(count=count), "me")
    expected = first_fit(n, count, lambda c: c not in busy and c not in failed)
    if expected is None:
        assert isinstance(got, Denied)
        assert alloc.cores_of("me") == []
    else:
        assert got == expected
        assert got == list(range(got[0], got[0] + count))
        assert alloc.cores_of("me") == got


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), data=st.data())
def test_visible_grant_is_exactly_the_requested_cores(n, data):
    alloc = CoreAllocator(n)
    wanted = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    assert alloc.grant(CoreRequest(visible=tuple(wanted)), "me") == wanted
    assert alloc.cores_of("me") == wanted
    assert alloc.free_cores() == [c for c in range(n) if c not in wanted]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), data=st.data())
def test_default_request_needs_every_core_free(n, data):
    alloc = CoreAllocator(n)
    assert alloc.grant(CoreRequest(), "all") == list(range(n))
    alloc.release("all")
    blocker = data.draw(st.integers(0, n - 1))
    alloc.grant(CoreRequest(visible=(blocker,)), "blocker")
    d = alloc.grant(CoreRequest(), "me")
    assert isinstance(d, Denied)
    assert d.requested == list(range(n))
    assert d.busy == {blocker: "blocker"}
    assert d.could_succeed_later is True
    assert alloc.cores_of("me") == []


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), data=st.data())
def test_release_frees_exactly_that_owners_cores(n, data):
    alloc = CoreAllocator(n)
    split = data.draw(st.integers(0, n))
    a = list(range(split))
    b = list(range(split, n))
    if a:
        assert alloc.grant(CoreRequest(visible=tuple(a)), "a") == a
    if b:
        assert alloc.grant(CoreRequest(visible=tuple(b)), "b") == b
    assert alloc.release("a") == a
    assert alloc.cores_of("b") == b
    assert alloc.free_cores() == a
    assert alloc.release("a") == []
    assert alloc.release("nobody") == []


def test_first_fit_skips_a_too_short_gap():
    alloc = CoreAllocator(8)
    alloc.grant(CoreRequest(visible=(2,)), "x")
    alloc.grant(CoreRequest(visible=(5,)), "y")
    # free runs: 0-1 (2), 3-4 (2), 6-7 (2): count 2 takes the first; count 3 fits nowhere
    assert isinstance(alloc.grant(CoreRequest(count=3), "z"), Denied)
    assert alloc.grant(CoreRequest(count=2), "z") == [0, 1]
    assert alloc.grant(CoreRequest(count=2), "w") == [3, 4]


def test_seed_example_two_processes_num_cores_two():
    alloc = CoreAllocator(8)
    assert alloc.grant(CoreRequest(count=2), "p1") == [0, 1]
    assert alloc.grant(CoreRequest(count=2), "p2") == [2, 3]
    alloc.release("p1")
    assert alloc.grant(CoreRequest(count=2), "p3") == [0, 1]
    assert alloc.grant(CoreRequest(count=4), "p4") == [4, 5, 6, 7]
    assert alloc.free_cores() == []


def test_an_owner_holds_one_grant():
    alloc = CoreAllocator(4)
    alloc.grant(CoreRequest(visible=(0,)), "a")
    with pytest.raises(ValueError, match="already holds"):
        alloc.grant(CoreRequest(visible=(1,)), "a")
    assert alloc.cores_of("a") == [0]
    assert alloc.owner_of(1) is None


def test_failed_core_is_never_granted_and_healthy_again_is():
    alloc = CoreAllocator(4)
    alloc.mark_failed(1)
    d = alloc.grant(CoreRequest(visible=(1,)), "a")
    assert isinstance(d, Denied) and d.failed == [1] and d.could_succeed_later is False
    assert alloc.grant(CoreRequest(count=2), "a") == [2, 3]
    d = alloc.grant(CoreRequest(count=2), "b")
    assert isinstance(d, Denied) and d.could_succeed_later is True  # nc2-nc3 come free when "a" releases
    d = alloc.grant(CoreRequest(count=3), "b")
    assert isinstance(d, Denied) and d.could_succeed_later is False  # no run of 3 avoids the failed nc1
    alloc.release("a")
    alloc.mark_healthy(1)
    assert alloc.grant(CoreRequest(), "c") == [0, 1, 2, 3]


def test_failed_core_blocks_default_request_forever():
    alloc = CoreAllocator(3)
    alloc.mark_failed(2)
    d = alloc.grant(CoreRequest(), "a")
    assert isinstance(d, Denied)
    assert d.failed == [2] and d.busy == {} and d.could_succeed_later is False


def test_denied_count_could_succeed_later_when_only_busy():
    alloc = CoreAllocator(4)
    alloc.grant(CoreRequest(visible=(1,)), "a")
    alloc.mark_failed(3)
    d = alloc.grant(CoreRequest(count=3), "b")  # 0-2 would work once nc1 is released
    assert isinstance(d, Denied) and d.could_succeed_later is True
    assert d.busy == {1: "a"} and d.failed == [3]
    d = alloc.grant(CoreRequest(count=4), "b")
    assert isinstance(d, Denied) and d.could_succeed_later is False


def test_busy_and_failed_visible_request_cannot_succeed_later():
    alloc = CoreAllocator(4)
    alloc.grant(CoreRequest(visible=(0,)), "a")
    alloc.mark_failed(1)
    d = alloc.grant(CoreRequest(visible=(0, 1)), "b")
    assert isinstance(d, Denied)
    assert d.busy == {0: "a"} and d.failed == [1] and d.could_succeed_later is False


def test_allocator_needs_a_core():
    with pytest.raises(ValueError):
        CoreAllocator(0)
    with pytest.raises(ValueError):
        CoreAllocator(-1)


# ----------------------------------------------------------------------------------------------------------------
# Validation.


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), data=st.data())
def test_validate_rejects_out_of_range_visible(n, data):
    alloc = CoreAllocator(n)
    good = data.draw(st.sets(st.integers(0, n - 1)))
    bad = data.draw(st.sets(st.integers(n, 64) | st.integers(-64, -1), min_size=1))
    req = CoreRequest(visible=tuple(sorted(good | bad)))
    with pytest.raises(NeuronCoreSpecError) as info:
        alloc.validate(req)
    assert isinstance(info.value, ValueError)
    assert f"this host has {n} cores" in str(info.value)
    with pytest.raises(NeuronCoreSpecError):
        alloc.grant(req, "me")
    assert alloc.cores_of("me") == [] and alloc.free_cores() == list(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 16), extra=st.integers(1, 100))
def test_validate_rejects_count_above_host(n, extra):
    alloc = CoreAllocator(n)
    with pytest.raises(NeuronCoreSpecError, match=f"NEURON_RT_NUM_CORES={n + extra} but this host has {n} cores"):
        alloc.validate(CoreRequest(count=n + extra))
    alloc.validate(CoreRequest(count=n))  # exactly n is fine


def test_validate_rejects_empty_visible():
    with pytest.raises(NeuronCoreSpecError, match="names no core"):
        CoreAllocator(4).validate(CoreRequest(visible=()))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 16), data=st.data())
def test_validate_accepts_every_valid_request(n, data):
    CoreAllocator(n).validate(data.draw(request_strategy(n)))


def test_visible_wins_over_count_in_validate_and_grant():
    alloc = CoreAllocator(4)
    req = CoreRequest(visible=(3,), count=99)  # count is ignored when visible is given
    alloc.validate(req)
    assert alloc.grant(req, "a") == [3]


# ---- Bugs (these fail against the current code; see the report) ----------------------------------------------


@pytest.mark.parametrize("count", [-1, -5])
def test_validate_rejects_negative_count(count):
    """A negative count can never be met; the broker passes ``Acquire.count`` from the wire straight in.

    Currently validate() accepts it and grant() answers Denied(could_succeed_later=True), so a client with
    NEURON_RT_ACQUIRE_TIMEOUT set would be queued for a request that can never be granted.
    """
    alloc = CoreAllocator(4)
    with pytest.raises(NeuronCoreSpecError):
        alloc.validate(CoreRequest(count=count))


def test_count_zero_never_grants_an_empty_set():
    """count=0 means "all cores" (CoreRequest.describe says so); it must never produce an empty grant."""
    alloc = CoreAllocator(4)
    alloc.grant(CoreRequest(visible=(0,)), "x")
    try:
        got = alloc.grant(CoreRequest(count=0), "me")
    except NeuronCoreSpecError:
        return
    assert got != [], "count=0 granted no cores at all"
    if not isinstance(got, Denied):
        assert got == [0, 1, 2, 3]


def test_validate_rejects_duplicate_visible_cores():
    """``visible=(1, 1)`` (a hostile or buggy Acquire) is granted as ``[1, 1]``: the lease claims core 1 twice."""
    alloc = CoreAllocator(4)
    req = CoreRequest(visible=(1, 1))
    try:
        alloc.validate(req)
    except NeuronCoreSpecError:
        return
    got = alloc.grant(req, "me")
    assert got == [1], f"duplicate visible cores granted as {got}"
