"""Greedy and speculative decoding on causal language models whose KV caches stay on their cores.

``generate(prompt_ids, target_model, draft_model=None, max_new_tokens=32, speculation_length=4)`` runs the loop in
the client; each step is one call per model (batch size 1, as the reference):

* **greedy** (no draft): the prompt in one call (pieces of at most the largest bucket), then one token per call;
* **speculative** (seed 003's naive speculative decoding): the draft proposes ``k`` tokens one by one; the target
  checks all of them in one call (the last accepted token plus the ``k`` proposals); the longest prefix on which the
  target's own greedy choice agrees is kept, plus the target's token after it (so every round gains at least one
  token). A rejection needs no cache surgery: a model's call says where its tokens go (``position``), entries past
  the accepted ones are masked out and later overwritten, so each model's position counter is simply set back.

The output is exactly the target's greedy output whenever the target scores a token the same way in a 1-token call
and inside a (k+1)-token call; the tests check it token for token.

Models follow :mod:`neuron_client.generation.decoder`'s convention: ``model(input_ids [1, T], position [1])`` returns the
logits ``[1, T, vocab]`` (or a tuple starting with them); a model traced with ``resident=False`` takes and returns
its cache too, which :class:`CachedLM` then carries from call to call (for comparison).

Larger batches would need a position per sequence (the cache rows advance differently once sequences accept
different numbers of tokens), a per-row mask, and padding of the verified block to the longest row; the reference
supports batch size 1 only, and so does this loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_SPECULATION_LENGTH = 4


def greedy_accept(proposed: list[int], target_choice: list[int]) -> tuple[int, int]:
    """(how many of ``proposed`` the target accepts, the token it adds after them).

    ``target_choice[i]`` is the target's greedy token after the sequence extended by ``proposed[:i]``; it has one
    more entry than ``proposed``. Proposals are accepted while they equal the target's choice.
    """
    if len(target_choice) != len(proposed) + 1:
        raise ValueError(f"need {len(proposed) + 1} target choices for {len(proposed)} proposals, got "
                         f"{len(target_choice)}")
    n = 0
    while n < len(proposed) and proposed[n] == target_choice[n]:
        n += 1
    return n, target_choice[n]


@dataclass
class GenerationStats:
    target_calls: int = 0
    draft_calls: int = 0
    rounds: int = 0  # speculative rounds (draft proposals checked by the target)
    proposed: int = 0
    accepted: int = 0
    new_tokens: int = 0
    per_round: list = field(default_factory=list)  # accepted count of each round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict:
        return {"target_calls": self.target_calls, "draft_calls": self.draft_calls, "rounds": self.rounds,
                "proposed": self.proposed, "accepted": self.accepted, "new_tokens": self.new_tokens,
                "acceptance_rate": self.acceptance_rate}


class CachedLM:
    """A causal LM with a KV cache, seen by the decoding loop: ``feed(tokens, position) -> logits [T, vocab]``."""

    def __init__(self, model, max_length: int | None = None, max_tokens_per_call: int | None = None):
        self.model = model
        meta = (getattr(model, "meta", None) or {}).get("decoder") or {}
        self.resident = bool(meta.get("resident", True))
        self.max_length = max_length or meta.get("max_length") or getattr(model, "max_length", None) \
            or getattr(model, "cache_length", None)
        buckets = meta.get("buckets")
        self.max_tokens = max_tokens_per_call or (max(buckets) if buckets else 1 << 30)
        self.calls = 0
        self.cache = None
        if not self.resident:
            shape = meta.get("cache_shape")
            if not shape:
                raise ValueError("a model traced with resident=False records its cache shape; this one does not")
            dtype = getattr(torch, meta.get("cache_dtype", "float32"))
            self.cache = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    def feed(self, tokens: list[int], position: int) -> torch.Tensor:
        """Run ``tokens`` at ``position`` onwards (in pieces of at most the largest bucket); their logits."""
        if self.max_length is not None and position + len(tokens) > self.max_length:
            raise ValueError(f"positions {position}..{position + len(tokens) - 1} exceed the model's maximum "
                             f"length of {self.max_length} tokens")
        pieces = []
        for start in range(0, len(tokens), self.max_tokens):
            chunk = tokens[start:start + self.max_tokens]
            ids = torch.tensor([chunk], dtype=torch.long)
            pos = torch.tensor([position + start], dtype=torch.long)
            with torch.no_grad():  # an eager module (a local check) as well as a NeuronModel
                if self.resident:
                    out = self.model(ids, pos)
                else:
                    out = self.model(ids, pos, *self.cache)
                    self.cache = (out[1], out[2])
            self.calls += 1
            logits = out[0] if isinstance(out, (tuple, list)) else out
            pieces.append(logits[0])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _lm(model) -> CachedLM:
    return model if isinstance(model, CachedLM) else CachedLM(model)


def generate(prompt_ids, target_model, draft_model=None, max_new_tokens: int = 32,
             speculation_length: int = DEFAULT_SPECULATION_LENGTH, eos_token_id: int | None = None,
             stats: GenerationStats | None = None) -> torch.Tensor:
    """Greedy decoding of ``target_model`` (speculative with ``draft_model``); returns ``[1, prompt + new]`` ids.

    ``prompt_ids``: a ``[1, n]`` (or ``[n]``) tensor or a list of ints; batch size 1. ``stats`` (a
    :class:`GenerationStats`) is filled in: calls, proposals, accepted proposals (``acceptance_rate``).
    """
    prompt = _prompt(prompt_ids)
    if max_new_tokens < 1:
        return torch.tensor([prompt], dtype=torch.long)
    if not isinstance(speculation_length, int) or speculation_length < 0:
        raise ValueError(f"speculation_length must be an int >= 0, got {speculation_length!r}")
    stats = stats if stats is not None else GenerationStats()
    target = _lm(target_model)
    draft = _lm(draft_model) if draft_model is not None and speculation_length > 0 else None
    limit = min(x for x in (target.max_length, draft.max_length if draft else None, 1 << 30) if x is not None)
    if len(prompt) + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones exceeds the models' "
                         f"maximum length of {limit} tokens")
    calls0 = (target.calls, draft.calls if draft else 0)

    logits = target.feed(prompt, 0)
    out = [int(logits[-1].argmax())]
    t_len = len(prompt)  # tokens whose keys and values are in the target's cache (the last output is not)
    d_len = 0  # the same for the draft, which reads the prompt with its first proposal
    while len(out) < max_new_tokens and (eos_token_id is None or out[-1] != eos_token_id):
        seq = prompt + out
        k = min(speculation_length, max_new_tokens - len(out), limit - len(seq)) if draft is not None else 0
        if k <= 0:
            logits = target.feed(seq[t_len:], t_len)
            t_len = len(seq)
            out.append(int(logits[-1].argmax()))
            continue
        proposed = []
        dl = draft.feed(seq[d_len:], d_len)
        d_len = len(seq)
        proposed.append(int(dl[-1].argmax()))
        while len(proposed) < k:
            dl = draft.feed(proposed[-1:], d_len)
            d_len += 1
            proposed.append(int(dl[-1].argmax()))
        fed = seq[t_len:]
        tl = target.feed(fed + proposed, t_len)
        choice = tl[len(fed) - 1:].argmax(dim=-1).tolist()
        n, nxt = greedy_accept(proposed, choice)
        stats.rounds += 1
        stats.proposed += k
        stats.accepted += n
        stats.per_round.append(n)
        out += proposed[:n] + [nxt]
        t_len = len(seq) + n  # rejected proposals' cache entries lie past this: masked, later overwritten
        d_len = min(d_len, len(seq) + n)
    out = out[:max_new_tokens]
    if eos_token_id is not None and eos_token_id in out:
        out = out[:out.index(eos_token_id) + 1]
    stats.new_tokens += len(out)
    stats.target_calls += target.calls - calls0[0]
    stats.draft_calls += (draft.calls - calls0[1]) if draft else 0
    return torch.tensor([prompt + out], dtype=torch.long)


def _prompt(prompt_ids) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2:
            if prompt_ids.shape[0] != 1:
                raise ValueError(f"batch size 1 only (as the reference); got a batch of {prompt_ids.shape[0]}")
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be [1, n] or [n], got shape {list(prompt_ids.shape)}")
        prompt = [int(t) for t in prompt_ids.tolist()]
    else:
        prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    return prompt
