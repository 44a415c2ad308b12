"""The metrics endpoint's text is valid Prometheus exposition: `promtool check metrics` passes (when promtool is
installed: Debian's `prometheus` package, which scripts/setup installs where it can), quantiles are a summary's,
counters are counters, and per-model series are labelled by model name."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from neuron_client.wire import status
from tests.unit.test_metrics_privacy import render, status_doc


def busy_doc() -> status.StatusDoc:
    """The sample document with calls counted: a latency window, a histogram, two models of one name."""
    doc = status_doc("python app.py")
    core = doc.cores[0]
    core.perf.p50_ms, core.perf.p99_ms, core.perf.window = 0.4, 1.5, 3
    core.perf.busy_s, core.perf.latency_sum_s = 0.002, 0.003
    core.perf.latency_hist.counts[3] = 3
    core.models.append(status.ModelStatus(id=2, name="m.pt", requests=4, bytes=100, failures=1, inferences=20,
                                          queue_s=0.25, compute_s=1.5))
    core.worker.restarts, core.worker.recent_crashes = 7, 2
    return doc


def test_promtool_accepts_the_metrics():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus; scripts/setup does it "
                    "where it can)")
    out = subprocess.run([promtool, "check", "metrics"], input=render(busy_doc()), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_types_and_per_model_series():
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(render(busy_doc()))}
    assert families["neuron_core_latency_seconds"].type == "summary"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["neuron_core_latency_seconds"].samples}
    assert samples[("neuron_core_latency_seconds", (("core", "0"), ("quantile", "0.99")))] == 0.0015
    assert samples[("neuron_core_latency_seconds_count", (("core", "0"),))] == 3
    assert families["neuron_core_request_duration_seconds"].type == "histogram"
    for counter in ("neuron_worker_restarts", "neuron_core_requests", "neuron_model_requests", "neuron_core_wait_seconds"):
        assert families[counter].type == "counter", counter
    restarts = families["neuron_worker_restarts"].samples[0]
    assert restarts.name == "neuron_worker_restarts_total" and restarts.value == 7
    assert families["neuron_worker_recent_crashes"].samples[0].value == 2
    wait = families["neuron_core_wait_seconds"].samples[0].value
    assert abs(wait - 0.001) < 1e-9  # request duration less compute
    (per_model,) = families["neuron_model_requests"].samples  # two models of one name on the core: one series
    assert per_model.labels == {"model": "m.pt", "core": "0"} and per_model.value == 3 + 4
    assert families["neuron_model_bytes"].samples[0].value == 200
    for name, value in (("neuron_model_failures", 1), ("neuron_model_inferences", 20), ("neuron_model_queue_seconds",
                                                                                     0.25),
                        ("neuron_model_compute_seconds", 1.5)):
        assert families[name].type == "counter", name
        (sample,) = families[name].samples
        assert sample.name == name + "_total" and sample.value == value, sample
    (build,) = families["neuron_build_info"].samples
    import neuron_client

    assert build.labels["version"] == neuron_client.__version__ and build.value == 1
