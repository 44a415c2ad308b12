"""A GPT-2-architecture causal decoder with its KV cache as state buffers, for :mod:`neuron_client.generation`.

Why not trace Hugging Face's ``GPT2LMHeadModel`` itself: its cache is a Python ``Cache`` object grown by
concatenation, so every step has new shapes and the cache is not a tensor the traced graph could keep. This module is
the same network (same weights, copied from a ``GPT2LMHeadModel``: ``from_hf_gpt2``; same logits, checked by the
tests) written for a fixed-size cache:

* ``k_cache`` / ``v_cache``: buffers ``[layers, 1, heads, cache_length, head_dim]``, written in place at the
  positions of the tokens of each call (``index_copy_``) and returned as outputs 1 and 2, which
  ``io_aliases = {k_cache: 1, v_cache: 2}`` keeps on the core;
* ``forward(input_ids [1, T], position [1])``: the tokens sit at positions ``position .. position+T-1``; each
  attends to the cache entries at positions up to its own. Entries beyond (left by a rejected speculation, or by the
  padding a bucket kernel adds) are masked out and overwritten later, so rolling back is passing an earlier position.

:func:`trace_decoder` packages one as a bucketed model over T (one graph per bucket length, all sharing one KV cache
through ``BucketModelConfig.shared_state_buffer``): any T up to the largest bucket, one call per step.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from neuron_client.tracing import bucketing, meta as trace_meta


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.head_dim = d // heads
        self.ln_1 = torch.nn.LayerNorm(d, eps=eps)
        self.c_attn = torch.nn.Linear(d, 3 * d)
        self.c_proj = torch.nn.Linear(d, d)
        self.ln_2 = torch.nn.LayerNorm(d, eps=eps)
        self.c_fc = torch.nn.Linear(d, 4 * d)
        self.mlp_proj = torch.nn.Linear(4 * d, d)

    def forward(self, x, k_cache, v_cache, positions, mask):
        b, t, d = x.shape
        hd = self.head_dim
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))  # [1, H, T, hd]
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        scores = torch.matmul(q, k_cache.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # [1, H, T, S]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        att = torch.matmul(torch.softmax(scores, dim=-1), v_cache)
        x = x + self.c_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.c_fc(self.ln_2(x))
        return x + self.mlp_proj(F.gelu(h, approximate="tanh"))


class CachedDecoder(torch.nn.Module):
    """GPT-2 with a resident KV cache; returns ``(logits [1, T, vocab], k_cache, v_cache)``."""

    def __init__(self, vocab: int, positions: int, d: int, layers: int, heads: int, cache_length: int,
                 eps: float = 1e-5, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.max_positions = positions
        self.cache_length = cache_length
        self.wte = torch.nn.Embedding(vocab, d)
        self.wpe = torch.nn.Embedding(positions, d)
        self.h = torch.nn.ModuleList(Block(d, heads, eps) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d, eps=eps)
        shape = (layers, 1, heads, cache_length, d // heads)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))
        self.to(dtype)

    @property
    def max_length(self) -> int:
        """Positions a sequence may use in this (eager) module: the cache's and the position table's."""
        return min(self.max_positions, self.cache_length)

    def io_aliases(self) -> dict:
        return {self.k_cache: 1, self.v_cache: 2}

    def forward(self, input_ids, position):
        t = input_ids.shape[1]
        positions = position.reshape(1) + torch.arange(t, device=input_ids.device)  # [T]
        x = self.wte(input_ids) + self.wpe(positions.clamp(max=self.max_positions - 1))
        keys = torch.arange(self.k_cache.shape[3], device=input_ids.device)
        mask = keys.unsqueeze(0) <= positions.unsqueeze(1)  # [T, S]: each token sees itself and what precedes it
        for i, block in enumerate(self.h):
            x = block(x, self.k_cache[i], self.v_cache[i], positions, mask)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head, as GPT-2
        return logits, self.k_cache, self.v_cache


def from_hf_gpt2(hf, layers=None, cache_length: int | None = None, dtype: torch.dtype = torch.float32
                 ) -> CachedDecoder:
    """A :class:`CachedDecoder` with the weights of a Hugging Face ``GPT2LMHeadModel`` (``layers``: which of its
    blocks to keep, in order; default all. A draft model is the first few).

    The cache holds ``cache_length`` positions (default ``n_positions``); keep room for a bucket's padding after the
    last real token.
    """
    cfg = hf.config
    if getattr(cfg, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"only GPT-2's tanh GELU is supported, not {cfg.activation_function!r}")
    blocks = list(range(cfg.n_layer)) if layers is None else list(layers)
    tr = hf.transformer
    dec = CachedDecoder(cfg.vocab_size, cfg.n_positions, cfg.n_embd, len(blocks), cfg.n_head,
                        cache_length or cfg.n_positions, eps=cfg.layer_norm_epsilon, dtype=dtype)
    with torch.no_grad():
        dec.wte.weight.copy_(tr.wte.weight)
        dec.wpe.weight.copy_(tr.wpe.weight)
        dec.ln_f.load_state_dict(tr.ln_f.state_dict())
        for mine, i in zip(dec.h, blocks):
            src = tr.h[i]
            mine.ln_1.load_state_dict(src.ln_1.state_dict())
            mine.ln_2.load_state_dict(src.ln_2.state_dict())
            for lin, conv in ((mine.c_attn, src.attn.c_attn), (mine.c_proj, src.attn.c_proj),
                              (mine.c_fc, src.mlp.c_fc), (mine.mlp_proj, src.mlp.c_proj)):
                lin.weight.copy_(conv.weight.t())  # HF's Conv1D keeps [in, out]
                lin.bias.copy_(conv.bias)
    return dec.to(dtype).eval()


def trace_decoder(decoder: CachedDecoder, buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64), resident: bool = True):
    """Package ``decoder`` as a bucketed model over the number of tokens per call.

    ``resident=True``: the KV cache is one shared state buffer kept on the core; calls are ``model(ids, position)``
    and return ``(logits,)``. ``resident=False`` (for comparison): the cache travels, ``model(ids, position, k, v)``
    returns ``(logits, k, v)``. The largest bucket bounds a prompt's length (longer prompts are fed in pieces).
    """
    buckets = sorted(int(b) for b in buckets)
    examples = []
    for b in buckets:
        ex = (torch.zeros(1, b, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        if not resident:
            ex += (decoder.k_cache.clone(), decoder.v_cache.clone())
        examples.append(ex)
    if resident:
        config = bucketing.BucketModelConfig(bucketing.sequence_length_kernel, (buckets, 1, 1),
                                             shared_state_buffer=[decoder.k_cache, decoder.v_cache])
        packaged = bucketing.package_buckets(lambda: (decoder, decoder.io_aliases()), examples, config)
    else:
        config = bucketing.BucketModelConfig(bucketing.sequence_length_kernel, (buckets, 1, 1))
        packaged = bucketing.package_buckets(_CacheAsInputs(decoder), examples, config)
    max_length = min(decoder.max_positions, decoder.cache_length - buckets[-1])  # room for a bucket's padding
    if max_length < 1:
        raise ValueError(f"a cache of {decoder.cache_length} positions leaves no room after padding to "
                         f"{buckets[-1]} tokens; make the cache longer")
    trace_meta.update_meta(packaged, decoder={"max_length": max_length,
                                           "cache_length": decoder.cache_length, "buckets": buckets,
                                           "resident": bool(resident), "vocab": decoder.wte.num_embeddings,
                                           "cache_shape": list(decoder.k_cache.shape),
                                           "cache_dtype": str(decoder.k_cache.dtype).replace("torch.", "")})
    return packaged


class _CacheAsInputs(torch.nn.Module):
    """The decoder with its cache passed in and returned each call (nothing resident)."""

    def __init__(self, decoder: CachedDecoder):
        super().__init__()
        self.decoder = copy.deepcopy(decoder)
        self.decoder._buffers["k_cache"] = self.decoder._buffers["v_cache"] = None  # the graph keeps no cache

    def forward(self, input_ids, position, k_cache, v_cache):
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
        dec = self.decoder
        dec._buffers["k_cache"], dec._buffers["v_cache"] = k_cache, v_cache
        try:
            return dec(input_ids, position)
        finally:
            dec._buffers["k_cache"] = dec._buffers["v_cache"] = None


def example_gpt2(seed: int = 0, vocab: int = 1024, positions: int = 256, d: int = 128, layers: int = 4,
                 heads: int = 4, damp_upper: float = 0.15, damp_from: int | None = None):
    """The tests' and benchmark's GPT-2: ``transformers.GPT2LMHeadModel`` built from a config with a fixed seed
    (nothing downloaded). Its weights are random (``initializer_range=0.1``, so that greedy text is not one token
    repeated); the output projections of its blocks from ``damp_from`` (default: the upper half) are scaled by
    ``damp_upper``, so that a draft made of the blocks below (``from_hf_gpt2(hf, layers=range(layers // 2))``,
    sharing embeddings, final layer norm and head) agrees with it about half of the time, as a distilled draft
    would. Undamped, such a draft agrees on about 6 % of the tokens."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d, n_layer=layers, n_head=heads,
                                  bos_token_id=vocab - 1, eos_token_id=vocab - 1, initializer_range=0.1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for block in hf.transformer.h[layers // 2 if damp_from is None else damp_from:]:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.mul_(damp_upper)
                proj.bias.mul_(damp_upper)
    return hf
