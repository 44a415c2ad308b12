"""The metrics endpoint, readable by every local user, shows no owner's command line unless the broker is started
with --metrics-show-cmdline (#13), and listens on 127.0.0.1 by default."""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from broker import cli, metrics
from neuron_client.wire import status
from tests.helpers import sample_status_doc

SECRET_CMD = "/opt/venv/bin/python /srv/app/serve.py --db-password hunter2 --token=s3cr3t"


def status_doc(cmd: str = SECRET_CMD) -> status.StatusDoc:
    return sample_status_doc(cmd)


def render(doc: status.StatusDoc, **kwargs) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):
            yield from metrics.families(doc, **kwargs)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return generate_latest(registry).decode()


def test_no_command_line_by_default():
    text = render(status_doc())
    for secret in ("hunter2", "s3cr3t", "serve.py", "/opt/venv", "--db-password"):
        assert secret not in text
    assert 'neuron_core_owner_info{cmd="python",core="0",pid="4242"} 1.0' in text
    assert 'neuron_process_cores{cmd="python",pid="4242"} 1.0' in text


def test_command_line_when_opted_in():
    text = render(status_doc(), show_cmdline=True)
    assert "--db-password hunter2" in text and 'pid="4242"' in text


@pytest.mark.parametrize("cmd, label", [("", ""), ("python", "python"), ("  /usr/bin/python3   -c x", "python3"),
                                        ("/a/b/c", "c")])
def test_command_label(cmd, label):
    assert metrics.command_label(cmd) == label
    assert metrics.command_label("x" * 1000, show_cmdline=True) == "x" * metrics.CMDLINE_MAX_CHARS


def scrape(show_cmdline=None) -> tuple[str, str]:
    """Serve the endpoint on a free port, with a thread standing in for the broker's loop; (host, metrics text)."""
    snapshots = metrics.Snapshots()
    server = metrics.serve(snapshots, 0, show_cmdline=show_cmdline)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            snapshots.publish_if_wanted(status_doc)
            time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(metrics.url_of(server), timeout=10) as resp:
            return server.server_address[0], resp.read().decode()
    finally:
        stop.set()
        server.shutdown()
        thread.join(5)


def test_endpoint_is_local_and_private_by_default():
    host, text = scrape()
    assert host == "127.0.0.1"
    assert "hunter2" not in text and 'cmd="python"' in text


def test_endpoint_follows_the_module_default(monkeypatch):
    monkeypatch.setattr(metrics, "SHOW_CMDLINE", True)
    assert "hunter2" in scrape()[1]
    assert "hunter2" not in scrape(show_cmdline=False)[1]


def test_cli_flag():
    assert cli.parser().parse_args(["start"]).metrics_show_cmdline is False
    assert cli.parser().parse_args(["start"]).metrics_host == "127.0.0.1"
    assert cli.parser().parse_args(["start", "--metrics-show-cmdline"]).metrics_show_cmdline is True


def test_cli_passes_the_flag_on(monkeypatch, tmp_path):
    """Foreground: the flag reaches metrics.serve's default; daemon: it is handed to the broker it starts."""
    import broker.server

    seen = {}

    def run_foreground(*args, **kwargs):
        seen["fg"] = metrics.SHOW_CMDLINE
        return 0

    def spawn_broker(directory, cores, extra):
        seen["extra"] = extra
        return Pong

    monkeypatch.setattr(metrics, "SHOW_CMDLINE", False)
    monkeypatch.setattr(broker.server, "run_foreground", run_foreground)
    cli.main(["--dir", str(tmp_path), "start", "--cores", "1", "--foreground", "--metrics-port", "0",
              "--metrics-show-cmdline"])
    assert seen["fg"] is True

    class Pong:
        pid, cores, backend = 1, 1, "cpu"

    from broker.commands import _shared
    from neuron_client.runtime import autostart

    monkeypatch.setattr(autostart, "running_pid", lambda d: 0)
    monkeypatch.setattr(autostart, "spawn_broker", spawn_broker)
    monkeypatch.setattr(_shared, "fetch_status", lambda d: status_doc())
    cli.main(["--dir", str(tmp_path), "start", "--cores", "1", "--metrics-port", "0", "--metrics-show-cmdline"])
    assert "--metrics-show-cmdline" in seen["extra"]
