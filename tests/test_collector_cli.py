"""The collector's command lines: config loading and errors, --help, startup errors,
`gradwatch ingest`, `gradwatch runs`, `gradwatch alerts`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwatch.collector.config import ConfigError, ReduceLR, Stop, load_config
from gradwatch.collector.detectors.runbook import hint
from gradwatch.collector.ready import (
    NotReady,
    Ready,
    wait_for_ready_file,
    write_ready_file,
)
from gradwatch.protocol import PROTOCOL_VERSION, Bye, Hello, StepRecord, Steps, encode


def gradwatch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


# --- config ----------------------------------------------------------------------------------------


def test_config_defaults_file_env_and_flags(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nport = 9000\ntoken = "from-file"\n'
        "[retention]\nheartbeat_timeout = 5\n"
        '[actions.plateau]\naction = "reduce_lr"\nfactor = 0.3\n'
        '[[actions.amp_scale_collapse]]\naction = "checkpoint"\n'
        '[[actions.amp_scale_collapse]]\naction = "stop"\n'
    )
    config = load_config(path, {"server.port": 0, "server.host": None}, environ={"GRADWATCH_TOKEN": "from-env"})
    assert (config.server.port, config.server.host, config.server.token) == (0, "127.0.0.1", "from-env")
    assert config.retention.heartbeat_timeout == 5 and config.retention.finished_grace_seconds == 300
    assert config.actions["plateau"] == [ReduceLR(action="reduce_lr", factor=0.3, cooldown=200, min_lr=1e-6)]
    assert [p.action for p in config.actions["amp_scale_collapse"]] == ["checkpoint", "stop"]
    assert isinstance(config.actions["amp_scale_collapse"][1], Stop)
    assert load_config(None, environ={}).server.token is None


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[server]\nprot = 1\n", "unknown key 'server.prot'"),
        ("[retention]\nmax_runs = 0\n", "retention.max_runs"),
        ("[retention]\nmax_runs = 'many'\n", "retention.max_runs"),
        ("[metrics]\nlayer_cap = -1\n", "metrics.layer_cap"),
        ("[storage]\n", "unknown key 'storage'"),
        ("[detectors.nonfinite]\nbogus = 1\n", "detectors.nonfinite.bogus"),
        ("[detectors.no_such_kind]\n", "detectors.no_such_kind"),
        ('[actions.plateu]\naction = "reduce_lr"\n', "unknown alert kind 'plateu'"),
        ('[actions.plateau]\naction = "explode"\n', "actions.plateau.action"),
        ('[actions.plateau]\naction = "reduce_lr"\nfactor = 2\n', "actions.plateau.reduce_lr.factor"),
        ('[actions.plateau]\naction = "stop"\nmode = "flag"\n', "gradwatch.attach(..., stop='raise' | 'flag')"),
        ('[actions.plateau]\naction = "skip_step"\ncooldown = 3\n', "unknown key 'actions.plateau.skip_step.cooldown'"),
        ('[server]\ntls_cert = "a.pem"\n', "tls_cert and tls_key go together"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, toml: str, message: str):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_bad_config_is_a_clear_cli_error(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("[retention]\nheartbeat_timout = 5\n")
    result = gradwatch("collector", "--config", str(path), "--data", str(tmp_path / "d"))
    assert result.returncode == 2
    assert f"{path}: unknown key 'retention.heartbeat_timout'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_every_option_with_defaults():
    result = gradwatch("collector", "--help")
    assert result.returncode == 0
    for text in ("--host", "127.0.0.1", "--port", "8765", "--http-port", "9108", "--data", "--config",
                 "--token", "GRADWATCH_TOKEN", "--log-level", "heartbeat_timeout=60s"):
        assert text in result.stdout, text


@pytest.mark.parametrize("make_bad_dir", ["file in the way", "corrupt database"])
def test_unusable_data_dir_is_a_clear_startup_error(tmp_path: Path, make_bad_dir: str):
    data = tmp_path / "data"
    if make_bad_dir == "file in the way":
        data.write_text("not a directory")
    else:
        data.mkdir()
        (data / "history.sqlite3").write_bytes(b"this is not sqlite " * 100)
    result = gradwatch("collector", "--port", "0", "--http-port", "0", "--data", str(data))
    assert result.returncode == 2
    assert "gradwatch collector: error: cannot use data directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ready_file_names_both_addresses_and_goes_at_exit(collector):
    ready = json.loads(collector.ready_path.read_text())
    assert ready == {"ws_url": collector.ws_url, "http_url": collector.http_url, "pid": collector.proc.pid}
    assert collector.http_url.startswith("http://127.0.0.1:") and not collector.http_url.endswith(":0")
    assert collector.stop() == 0
    assert not collector.ready_path.exists()


def test_a_ready_file_another_process_left_is_not_taken(tmp_path: Path):
    path = tmp_path / "ready.json"
    write_ready_file(path, Ready("ws://127.0.0.1:1", "http://127.0.0.1:2", pid=1))  # a collector killed -9
    exiting = subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(NotReady, match="exited with status 0 before it was ready"):
        wait_for_ready_file(path, exiting, timeout=60)


# --- ingest and queries against a running collector --------------------------------------------------


def spool_lines() -> list[str]:
    def run(name: str, end: int) -> list[str]:
        hello = Hello(v=PROTOCOL_VERSION, run=name, layers=["w"])
        records = [StepRecord(step=s, time=time.time(), loss=1.0) for s in range(1, end + 1)]
        # one frame per record, as a probe writing its spool step by step would
        return [encode(hello), *(encode(Steps(records=[r])) for r in records), encode(Bye())]

    return [*run("spooled-a", 50), "this line is not json", *run("spooled-b", 3)]


@pytest.mark.slow
def test_ingest_replays_a_spool(collector, tmp_path: Path):
    spool = tmp_path / "spool.jsonl"
    spool.write_text("\n".join(spool_lines()) + "\n")
    result = gradwatch("ingest", str(spool), "--url", collector.ws_url)
    assert result.returncode == 1, result.stderr  # one line was rejected
    assert "2 connection(s), 1 rejected" in result.stdout
    assert "line 53:" in result.stdout  # the bad line, by number
    def both_finished() -> list[dict] | None:
        listed = collector.get_json("/api/runs")
        return listed if sum(r["status"] == "finished" for r in listed) == 2 else None

    runs = {r["name"]: r for r in collector.wait_for(both_finished, what="both spooled runs finished")}
    assert (runs["spooled-a"]["last_step"], runs["spooled-b"]["last_step"]) == (50, 3)


@pytest.mark.slow
def test_runs_and_alerts_commands(collector, tmp_path: Path):
    spool = tmp_path / "spool.jsonl"
    hello = Hello(v=PROTOCOL_VERSION, run="queried", layers=["w"])
    spool.write_text("\n".join([encode(hello), encode(Steps(records=[
        StepRecord(step=1, time=time.time(), loss=1.0), StepRecord(step=2, time=time.time(), loss=float("nan"))
    ])), encode(Bye())]))
    assert gradwatch("ingest", str(spool), "--url", collector.ws_url).returncode == 0
    collector.wait_for(lambda: collector.get_json("/api/alerts"), what="the alert")

    table = gradwatch("runs", "--url", collector.http_url)
    assert table.returncode == 0
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "LAST_STEP", "RANKS", "STARTED", "LAST_SEEN"]
    assert row.split()[:3] == ["queried", "finished", "2"]
    raw = json.loads(gradwatch("runs", "--url", collector.http_url, "--json").stdout)
    assert raw[0]["name"] == "queried"

    alerts = gradwatch("alerts", "queried", "--url", collector.http_url)
    assert alerts.returncode == 0
    header, fired, what_to_try, resolved = alerts.stdout.splitlines()
    assert fired.split()[2:5] == ["queried", "fired", "nonfinite"]
    assert resolved.split()[2:5] == ["queried", "resolved", "nonfinite"]  # the run ended with it open
    assert what_to_try == f"    try: {hint('nonfinite')}"  # under the alert it belongs to
    assert json.loads(gradwatch("alerts", "--url", collector.http_url, "--json").stdout)[0]["kind"] == "nonfinite"
    unknown = gradwatch("alerts", "other-run", "--url", collector.http_url)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip() == "gradwatch: no run named 'other-run'; known runs: queried"
    refused = gradwatch("alerts", "bad name!", "--url", collector.http_url)
    assert refused.returncode == 1 and "run must be" in refused.stderr


def test_queries_without_a_collector_say_how_to_start_one():
    for command in ("runs", "alerts"):
        result = gradwatch(command, "--url", "http://127.0.0.1:9")
        assert result.returncode == 1
        assert result.stderr.startswith("gradwatch: no collector answers at http://127.0.0.1:9 (")
        assert "Start one with `gradwatch collector`, or point --url (or $GRADWATCH_HTTP_URL)" in result.stderr


def test_queries_find_the_collector_where_the_user_says(collector, monkeypatch: pytest.MonkeyPatch):
    """host:port without a scheme, $GRADWATCH_HTTP_URL, and a clear word on the ingest port."""
    address = collector.http_url.split("://", 1)[1]
    assert gradwatch("runs", "--url", address).returncode == 0
    monkeypatch.setenv("GRADWATCH_HTTP_URL", collector.http_url)
    assert gradwatch("runs").returncode == 0
    ingest = gradwatch("runs", "--url", collector.ws_url.replace("ws://", "http://"))
    assert ingest.returncode == 1
    assert "is a collector's websocket (ingest) port; queries go to its HTTP port" in ingest.stderr


@pytest.mark.slow
def test_ingest_replays_the_ranks_of_a_sharded_run_together(collector, tmp_path: Path):
    paths = []
    for rank, grad_sq in ((0, 9.0), (1, 16.0)):
        hello = Hello(v=PROTOCOL_VERSION, run="sharded-spool", rank=rank, world_size=2, sharded=True, layers=["w"])
        records = [StepRecord(step=s, time=time.time(), grad_norm_sq=grad_sq) for s in range(1, 201)]
        path = tmp_path / f"spool.jsonl.rank{rank}"
        path.write_text("\n".join([encode(hello), *(encode(Steps(records=[r])) for r in records), encode(Bye())]))
        paths.append(str(path))
    result = gradwatch("ingest", *paths, "--url", collector.ws_url)
    assert result.returncode == 0, result.stdout + result.stderr
    collector.wait_for(lambda: collector.get_json("/api/runs")[0]["status"] == "finished", what="run finished")
    metrics = collector.metrics()
    assert 'gradwatch_steps_total{run="sharded-spool"} 200.0' in metrics
    assert 'gradwatch_grad_norm{run="sharded-spool"} 5.0' in metrics  # sqrt(9 + 16): both ranks merged


@pytest.mark.parametrize("module", ["gradwatch.collector.server", "gradwatch.client.replay", "gradwatch.client.query"])
def test_the_collector_and_its_clients_do_not_import_torch(module: str) -> None:
    """The collector's image has no torch: neither it nor `gradwatch ingest` may need it."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
