"""`gradwatch up`: the collector with a local Prometheus and Alertmanager, without containers.

Configs are generated into a state directory next to each server's data and logs. They are
written as JSON, which is valid YAML, so no YAML library is needed. Ctrl-C (or SIGTERM)
stops the servers in reverse order of start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Self

from gradwatch.collector.ready import NotReady, wait_for_ready_file

# Debian and Ubuntu name the Alertmanager binary after their package; upstream calls it alertmanager.
PROMETHEUS_NAMES = ("prometheus",)
ALERTMANAGER_NAMES = ("prometheus-alertmanager", "alertmanager")
DEBIAN_PACKAGES = "prometheus prometheus-alertmanager"
# The rules ship in the source tree (deploy/), next to the package in a checkout or editable install.
SOURCE_RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules" / "gradwatch.rules.yml"
# The job name the rules and the Fleet dashboard select on.
SCRAPE_JOB = "gradwatch"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class StackError(Exception):
    """A server that could not start; the message says which and why."""


@dataclass(frozen=True)
class StackSettings:
    state_dir: Path
    host: str = "127.0.0.1"
    ws_port: int = 8765
    http_port: int = 9108
    prometheus_port: int = 9090  # 0 = any free port (for all four)
    alertmanager_port: int = 9093
    scrape_interval: str = "5s"  # also the rule evaluation interval
    rules: Path | None = SOURCE_RULES
    webhook_url: str | None = None  # without one, alerts are only listed in Alertmanager's UI
    group_wait: str = "10s"
    group_interval: str = "1m"  # how soon a group's changes (its resolutions too) are notified
    collector_config: Path | None = None
    prometheus: str | None = None  # binary paths; None = not started
    alertmanager: str | None = None


def find_binary(names: tuple[str, ...]) -> str | None:
    for name in names:
        if path := shutil.which(name):
            return path
    return None


def prometheus_config(
    collector_target: str, alertmanager_target: str | None, rule_files: list[str], interval: str
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": rule_files,
        "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [{"targets": [collector_target]}]}],
    }
    if alertmanager_target:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_target]}]}]}
    return config


def alertmanager_config(webhook_url: str | None, group_wait: str, group_interval: str = "1m") -> dict[str, Any]:
    receiver: dict[str, Any] = {"name": "gradwatch"}
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    return {
        "route": {
            "receiver": "gradwatch",
            "group_by": ["alertname", "run"],
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": "4h",
        },
        "receivers": [receiver],
    }


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port_free(host: str, port: int, what: str, flag: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise StackError(
                f"port {port} on {host} is taken, so {what} cannot start there: stop what uses it "
                f"(the Debian package starts its own service: `systemctl stop {what}`) or pass {flag}"
            ) from None


def _connect_host(host: str) -> str:
    """Where local clients reach a server bound to `host` (a wildcard is not an address)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Server:
    """One child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # A session of its own: Ctrl-C reaches only `gradwatch up`, which stops the
            # servers in order instead of all of them dying at once.
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def raise_if_exited(self) -> None:
        if self.process is not None and (code := self.process.poll()) is not None:
            raise self.failure(f"exited with status {code}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def failure(self, why: str) -> StackError:
        return StackError(f"{self.name} {why}; last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _wait_ready(server: Server, url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        server.raise_if_exited()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise server.failure(f"was not ready at {url} after {START_TIMEOUT_S:.0f}s")


@dataclass
class Stack:
    """The collector, then Alertmanager, then Prometheus; `urls` once started."""

    settings: StackSettings
    servers: list[Server] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        state = s.state_dir.resolve()
        state.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        local = _connect_host(s.host)

        ready_file = state / "collector-ready.json"  # its addresses, the ports being possibly 0 (free)
        argv = [sys.executable, "-m", "gradwatch", "collector", "--host", s.host, "--port", str(s.ws_port),
                "--http-port", str(s.http_port), "--data", str(state / "collector"), "--ready-file", str(ready_file)]
        if s.collector_config:
            argv += ["--config", str(s.collector_config)]
        collector = self._launch("collector", argv, state)
        assert collector.process is not None
        try:
            ready = wait_for_ready_file(ready_file, collector.process, deadline - time.monotonic())
        except NotReady as err:
            raise collector.failure(str(err)) from None
        self.urls["collector"], http_url = ready.ws_url, ready.http_url
        self.urls["metrics"] = http_url + "/metrics"
        collector_port = urllib.parse.urlsplit(http_url).port

        alertmanager_target = None
        if s.alertmanager:
            port = self._port(s.host, s.alertmanager_port, "prometheus-alertmanager", "--alertmanager-port")
            config = state / "alertmanager.yml"
            config.write_text(json.dumps(alertmanager_config(s.webhook_url, s.group_wait, s.group_interval), indent=2))
            server = self._launch("alertmanager", [
                s.alertmanager, f"--config.file={config}", f"--storage.path={state / 'alertmanager'}",
                f"--web.listen-address={_hostport(s.host, port)}",
                "--cluster.listen-address=",  # no HA gossip port: a single local instance
            ], state)
            alertmanager_target = _hostport(local, port)
            _wait_ready(server, f"http://{alertmanager_target}/-/ready", deadline)
            self.urls["alertmanager"] = f"http://{alertmanager_target}"

        if s.prometheus:
            port = self._port(s.host, s.prometheus_port, "prometheus", "--prometheus-port")
            config = state / "prometheus.yml"
            rules = [str(s.rules.resolve())] if s.rules else []
            config.write_text(json.dumps(
                prometheus_config(_hostport(local, collector_port), alertmanager_target, rules, s.scrape_interval),
                indent=2,
            ))
            server = self._launch("prometheus", [
                s.prometheus, f"--config.file={config}", f"--storage.tsdb.path={state / 'prometheus'}",
                f"--web.listen-address={_hostport(s.host, port)}",
            ], state)
            _wait_ready(server, f"http://{_hostport(local, port)}/-/ready", deadline)
            self.urls["prometheus"] = f"http://{_hostport(local, port)}"

    def _port(self, host: str, port: int, what: str, flag: str) -> int:
        if port == 0:
            return free_port(host)
        _check_port_free(host, port, what, flag)
        return port

    def _launch(self, name: str, argv: list[str], state: Path) -> Server:
        server = Server(name, argv, state / "logs" / f"{name}.log")
        server.start()
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def wait(self) -> Server:
        """Block until one of the servers exits; return it."""
        while True:
            for server in self.servers:
                if server.exited():
                    return server
            time.sleep(0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path("gradwatch-data"),
                        help="configs, data and logs of all servers (default: ./gradwatch-data)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface every server binds (default 127.0.0.1; 0.0.0.0 lets remote "
                        "training jobs connect, and exposes Prometheus and Alertmanager too)")
    parser.add_argument("--port", type=int, default=8765, help="collector websocket port (default 8765)")
    parser.add_argument("--http-port", type=int, default=9108, help="collector /metrics port (default 9108)")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="default 9090; 0 = any free port")
    parser.add_argument("--alertmanager-port", type=int, default=9093, help="default 9093; 0 = any free port")
    parser.add_argument("--scrape-interval", default="5s", help="Prometheus scrape and rule evaluation interval")
    parser.add_argument("--rules", type=Path, default=SOURCE_RULES if SOURCE_RULES.is_file() else None,
                        help="Prometheus alerting rules (default: deploy/prometheus/rules/gradwatch.rules.yml "
                        "of the source tree)")
    parser.add_argument("--webhook", metavar="URL",
                        help="send Alertmanager's notifications to this webhook (default: none; see them in its UI)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="collector config file (TOML)")
    parser.add_argument("--prometheus", metavar="PATH", default=find_binary(PROMETHEUS_NAMES),
                        help="Prometheus binary (default: found on PATH)")
    parser.add_argument("--alertmanager", metavar="PATH", default=find_binary(ALERTMANAGER_NAMES),
                        help="Alertmanager binary (default: prometheus-alertmanager or alertmanager on PATH)")


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """Start the collector, Prometheus and Alertmanager on this machine (no containers).

    Prometheus (with gradwatch's alerting rules) and Alertmanager start when their binaries
    are installed. Ctrl-C stops them all.
    """
    binaries = {"prometheus": args.prometheus, "alertmanager": args.alertmanager}
    missing = [name for name, path in binaries.items() if not path]
    if missing:
        print(f"note: {' and '.join(missing)} not found, starting without; install the Debian packages "
              f"with `apt-get install {DEBIAN_PACKAGES}` (or pass --prometheus/--alertmanager PATH)",
              file=sys.stderr)
    if args.prometheus and args.rules is None:
        print("note: no alerting rules found (they are in the source tree's deploy/prometheus/rules/); "
              "pass --rules FILE", file=sys.stderr)
    settings = StackSettings(
        state_dir=args.state_dir, host=args.host, ws_port=args.port, http_port=args.http_port,
        prometheus_port=args.prometheus_port, alertmanager_port=args.alertmanager_port,
        scrape_interval=args.scrape_interval, rules=args.rules, webhook_url=args.webhook,
        collector_config=args.config, prometheus=args.prometheus, alertmanager=args.alertmanager,
    )
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    stack = Stack(settings)
    try:
        stack.start()
        width = max(map(len, stack.urls))
        for name, url in stack.urls.items():
            print(f"{name:<{width}}  {url}")
        web_view = stack.urls["metrics"].removesuffix("/metrics") + "/"
        print(f"train with gradwatch.attach(model, optimizer, url=\"{stack.urls['collector']}\"); "
              f"see the runs at {web_view}; "
              f"logs in {settings.state_dir / 'logs'}; Ctrl-C stops everything", flush=True)
        exited = stack.wait()
        print(f"error: {exited.failure('exited unexpectedly')}", file=sys.stderr)
        return 1
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
        return 0
    finally:
        stack.stop()
