"""The batched models an owner reports (``leases[].batchers``) as neuron-top and the metrics show them."""
from __future__ import annotations

import dataclasses

from broker import top
from tests.helpers import sample_batcher, sample_status_doc
from tests.unit.test_metrics_privacy import render


def test_metrics_have_one_series_per_batched_model():
    text = render(sample_status_doc())
    for line in ('neuron_batcher_requests_total{model="m.pt",pid="4242"} 40.0',
                 'neuron_batcher_executions_total{model="m.pt",pid="4242"} 10.0',
                 'neuron_batcher_rows_total{model="m.pt",pid="4242"} 40.0',
                 'neuron_batcher_queue_seconds_total{model="m.pt",pid="4242"} 0.02',
                 'neuron_batcher_compute_seconds_total{model="m.pt",pid="4242"} 0.05',
                 'neuron_batcher_refused_total{model="m.pt",pid="4242",reason="queue_full"} 1.0',
                 'neuron_batcher_refused_total{model="m.pt",pid="4242",reason="timed_out"} 0.0',
                 'neuron_batcher_queue_depth{model="m.pt",pid="4242"} 0.0',
                 'neuron_batcher_mean_batch_size{model="m.pt",pid="4242"} 4.0'):
        assert line in text, line


def frame_text(prev, cur) -> str:
    from rich.console import Console

    console = Console(width=160, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(top.frame(prev, cur, width=160))
    return console.export_text()


def test_top_shows_the_rates_between_two_samples_and_the_totals():
    first = sample_status_doc()
    second = sample_status_doc()
    lease = second.leases[0]
    b = sample_batcher(requests=40)
    lease.batchers = [dataclasses.replace(b, requests=140, served=140, executions=20, rows=140, queue_s=0.12,
                                          compute_s=0.15, waiting=3)]
    rows = top.batcher_rows(top.Sample(first, 0.0), top.Sample(second, 2.0))
    # 100 requests in 2 s, 100 rows in 10 batches, 0.1 s of queue over 100 requests, 0.1 s of compute over 10 batches
    assert rows == [["4242", "m.pt", "50.0", "10.0", "1.00ms", "10.00ms", "3", "140", "1"]]
    text = frame_text(top.Sample(first, 0.0), top.Sample(second, 2.0))
    assert "batched models (1)" in text and "COMPUTE T" in text and "10.00ms" in text
    none = sample_status_doc()
    none.leases[0].batchers = []
    assert "batched models" not in frame_text(None, top.Sample(none, 0.0))
    assert top.batcher_rows(None, top.Sample(first, 0.0))[0][2] == "-"  # one sample: no rate yet
