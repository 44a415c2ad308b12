"""Unit tests of greedy and speculative decoding (neuron_client.generation) and the cached GPT-2 decoder
(neuron_client.generation.decoder), in-process, no broker.

The acceptance rule is checked exhaustively on small cases; speculative decoding is checked against greedy decoding
on a fake language model whose cache is honest (a stale entry left by a rejected speculation would change its
output), and on the real cached decoder against Hugging Face's GPT-2.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from neuron_client.generation import decoder, generate as generation
from neuron_client.generation.generate import GenerationStats, generate, greedy_accept
from neuron_client.tracing import meta as trace_meta

# -- the acceptance rule --------------------------------------------------------------------------------------------


def test_greedy_accept_cases():
    assert greedy_accept([], [5]) == (0, 5)
    assert greedy_accept([1, 2, 3], [1, 2, 3, 4]) == (3, 4)  # all accepted, plus the target's next token
    assert greedy_accept([1, 2, 3], [9, 2, 3, 4]) == (0, 9)  # first rejected: the target's token instead
    assert greedy_accept([1, 2, 3], [1, 7, 3, 4]) == (1, 7)  # later proposals do not count after a rejection
    with pytest.raises(ValueError, match="need 3 target choices"):
        greedy_accept([1, 2], [1, 2])


def test_greedy_accept_exhaustive():
    for k in range(4):
        for proposed in itertools.product(range(3), repeat=k):
            for choice in itertools.product(range(3), repeat=k + 1):
                n, nxt = greedy_accept(list(proposed), list(choice))
                assert list(proposed[:n]) == list(choice[:n]) and nxt == choice[n]
                assert n == k or proposed[n] != choice[n]


# -- a fake language model with an honest cache ----------------------------------------------------------------------


class FakeLM:
    """Next token = a hash of the whole context, read from its own cache (written at the positions it is given).

    ``agree`` makes a draft: with it, the fake predicts the target's token unless the hash says otherwise.
    """

    def __init__(self, vocab=11, length=128, salt=0, agree=None):
        self.vocab, self.salt, self.agree = vocab, salt, agree
        self.cache = [None] * length
        self.cache_length = length

    def choice(self, context: tuple) -> int:
        h = hash((self.salt,) + context) % 1000003
        if self.agree is not None:
            target = self.agree.choice(context)
            return target if h % 100 < 60 else (target + 1) % self.vocab
        return h % self.vocab

    def __call__(self, ids, position):
        p = int(position)
        toks = ids[0].tolist()
        for i, t in enumerate(toks):
            self.cache[p + i] = t
        logits = torch.zeros(1, len(toks), self.vocab)
        for i in range(len(toks)):
            context = tuple(self.cache[: p + i + 1])
            assert None not in context, "read a position never written"
            logits[0, i, self.choice(context)] = 1.0
        return (logits,)


def fake_greedy(prompt, n, lm: FakeLM):
    seq = list(prompt)
    for _ in range(n):
        seq.append(lm.choice(tuple(seq)))
    return seq


@given(prompt=st.lists(st.integers(0, 10), min_size=1, max_size=12), k=st.integers(0, 6), n=st.integers(1, 30),
       salt=st.integers(0, 1000))
@settings(max_examples=150, deadline=None)
def test_speculative_equals_greedy_on_a_fake_model(prompt, k, n, salt):
    target = FakeLM(salt=salt)
    draft = FakeLM(salt=salt + 1, agree=FakeLM(salt=salt))
    stats = GenerationStats()
    out = generate(prompt, target, draft_model=draft, max_new_tokens=n, speculation_length=k, stats=stats)
    assert out.tolist() == [fake_greedy(prompt, n, FakeLM(salt=salt))]
    assert stats.new_tokens == n and stats.accepted <= stats.proposed
    if k and n > 1:  # one prompt call, then one verifying call per round
        assert stats.rounds >= 1 and stats.target_calls == 1 + stats.rounds
    else:
        assert stats.target_calls == n and stats.draft_calls == 0


def test_speculation_reduces_target_calls_and_reports_acceptance():
    prompt = [1, 2, 3]
    plain, spec = GenerationStats(), GenerationStats()
    generate(prompt, FakeLM(salt=5), max_new_tokens=40, stats=plain)
    generate(prompt, FakeLM(salt=5), draft_model=FakeLM(salt=6, agree=FakeLM(salt=5)), max_new_tokens=40,
             speculation_length=4, stats=spec)
    assert plain.target_calls == 40 and plain.draft_calls == 0
    assert spec.target_calls < 25 and 0.1 < spec.acceptance_rate < 0.9
    assert spec.target_calls == 1 + spec.rounds and sum(spec.per_round) == spec.accepted


def test_eos_stops_and_is_kept():
    target = FakeLM(salt=3)
    full = fake_greedy([4], 30, FakeLM(salt=3))[1:]
    eos = full[5]
    stop = full.index(eos)
    out = generate([4], target, max_new_tokens=30, eos_token_id=eos)
    assert out[0, 1:].tolist() == full[: stop + 1]


def test_prompt_forms_and_errors():
    target = FakeLM(length=16)
    assert generate(torch.tensor([[1, 2]]), target, max_new_tokens=2).shape == (1, 4)
    assert generate(torch.tensor([1, 2]), FakeLM(length=16), max_new_tokens=2).shape == (1, 4)
    assert generate([1, 2], FakeLM(length=16), max_new_tokens=0).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="batch size 1"):
        generate(torch.zeros(2, 3, dtype=torch.long), target)
    with pytest.raises(ValueError, match="at least one token"):
        generate([], target)
    with pytest.raises(ValueError, match="maximum length of 16"):
        generate([1] * 10, FakeLM(length=16), max_new_tokens=8)
    with pytest.raises(ValueError, match="speculation_length"):
        generate([1], target, draft_model=FakeLM(), speculation_length=-1)


def test_speculation_stops_short_of_the_maximum_length():
    out = generate([1] * 4, FakeLM(length=16, salt=2), draft_model=FakeLM(length=16, salt=3, agree=FakeLM(salt=2)),
                   max_new_tokens=13, speculation_length=6)
    assert out.tolist() == [fake_greedy([1] * 4, 13, FakeLM(salt=2))]


def test_long_prompts_are_fed_in_pieces():
    lm = FakeLM(salt=1)
    seen = []

    def spy(ids, position):
        seen.append(ids.shape[1])
        return lm(ids, position)

    out = generate(list(range(10)) * 2, generation.CachedLM(spy, max_length=64, max_tokens_per_call=8),
                   max_new_tokens=3)
    assert seen[:3] == [8, 8, 4] and out.tolist() == [fake_greedy(list(range(10)) * 2, 3, FakeLM(salt=1))]


# -- the cached GPT-2 decoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    return decoder.example_gpt2(seed=0, vocab=256, positions=64, d=64, layers=4, heads=4)


def test_decoder_matches_hugging_face_in_one_call_and_incrementally(gpt2):
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = gpt2(ids).logits
        dec = decoder.from_hf_gpt2(gpt2, cache_length=64)
        whole = dec(ids, torch.tensor([0]))[0]
        dec = decoder.from_hf_gpt2(gpt2, cache_length=64)
        parts = torch.cat([dec(ids[:, :7], torch.tensor([0]))[0], dec(ids[:, 7:8], torch.tensor([7]))[0],
                           dec(ids[:, 8:], torch.tensor([8]))[0]], 1)
    assert torch.allclose(whole, want, atol=1e-4) and torch.allclose(parts, want, atol=1e-4)


def test_stale_cache_entries_past_the_position_are_ignored(gpt2):
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dec = decoder.from_hf_gpt2(gpt2, cache_length=64)
        clean = dec(ids, torch.tensor([0]))[0]
        dec(torch.randint(0, 256, (1, 6)), torch.tensor([10]))  # a speculation that will be rejected
        again = dec(ids[:, 9:], torch.tensor([9]))[0]
    assert torch.allclose(again[0, -1], clean[0, -1], atol=1e-5)


def test_speculative_equals_greedy_on_the_eager_decoders(gpt2):
    def lm(layers=None):
        return generation.CachedLM(decoder.from_hf_gpt2(gpt2, layers=layers, cache_length=64), max_length=48)

    with torch.no_grad():
        for seed in range(3):
            prompt = torch.randint(0, 256, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
            want = generate(prompt, lm(), max_new_tokens=20)
            for k in (1, 3):
                stats = GenerationStats()
                got = generate(prompt, lm(), draft_model=lm(layers=[0, 1]), max_new_tokens=20, speculation_length=k,
                               stats=stats)
                assert torch.equal(got, want) and stats.proposed > 0


def test_trace_decoder_records_its_limits(gpt2):
    dec = decoder.from_hf_gpt2(gpt2, cache_length=64 + 8)
    packaged = decoder.trace_decoder(dec, buckets=(1, 8))
    meta = trace_meta.get_meta(packaged)["decoder"]
    assert meta["max_length"] == 64 and meta["buckets"] == [1, 8] and meta["resident"]
    (logits,) = packaged(torch.tensor([[1, 2, 3]]), torch.tensor([0]))
    assert logits.shape == (1, 3, 256)
    with pytest.raises(ValueError, match="leaves no room"):
        decoder.trace_decoder(decoder.from_hf_gpt2(gpt2, cache_length=8), buckets=(1, 8))
