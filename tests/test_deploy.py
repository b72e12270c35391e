"""deploy/: Prometheus and Alertmanager configs checked by their own tools, rules unit-tested
with promtool, and the container, compose and Kubernetes files consistent with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.collector.detectors.runbook import REPOSITORY_URL, runbook, runbook_url
from gradwatch.dashboards import k8s
from gradwatch.dashboards.cli import dashboard_files
from gradwatch.protocol import ALERT_KINDS
from gradwatch.stack import alertmanager_config, prometheus_config
from tests.test_runbook import doc_sections

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "gradwatch.rules.yml"
ALERTMANAGER = DEPLOY / "alertmanager"
K8S = DEPLOY / "k8s"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian packages prometheus and prometheus-alertmanager; "
                    "CI installs them)")
    return path


def run_tool(*argv: str) -> str:
    """The tool's standard output; it must succeed."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load(path: Path) -> Any:
    return yaml().safe_load(path.read_text())


def load_all(path: Path) -> dict[tuple[str, str], Any]:
    """The documents of a multi-document manifest by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml().safe_load_all(path.read_text())}


def yaml() -> Any:
    # Only the tests that parse YAML need PyYAML; the promtool and amtool checks run without it.
    return pytest.importorskip("yaml", reason="PyYAML (the `test` extra) reads the deploy files")


def rules_by_name() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in load(RULES)["groups"] for r in group["rules"]}


# --- Prometheus -------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    run_tool(tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_promtool_check_rules() -> None:
    assert "SUCCESS" in run_tool(tool("promtool"), "check", "rules", str(RULES))


def test_promtool_test_rules() -> None:
    tests = sorted(str(p) for p in (PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    run_tool(tool("promtool"), "test", "rules", *tests)


def test_one_rule_per_detector_kind() -> None:
    rules = rules_by_name()
    forwarded = {}
    for name, rule in rules.items():
        if match := re.fullmatch(r'gradwatch_alert_active\{kind="(\w+)"\} == 1', rule["expr"]):
            forwarded[match.group(1)] = name
            # The collector already debounces; severity comes from the series.
            assert "for" not in rule and "severity" not in rule.get("labels", {}), name
    assert sorted(forwarded) == sorted(ALERT_KINDS)


def test_every_rule_is_described_and_has_a_severity() -> None:
    for name, rule in rules_by_name().items():
        assert name.startswith("Gradwatch")
        assert {"summary", "description"} <= set(rule["annotations"]), name
        from_series = "gradwatch_alert_active" in rule["expr"]
        assert from_series or rule["labels"]["severity"] in ("info", "warning", "critical"), name


def test_every_rule_links_its_runbook_and_says_what_to_try() -> None:
    """Each rule's runbook_url finds a section of the repository's docs; a detector kind's
    rule carries the same title, hint and link as the collector's own alert."""
    docs = f"{REPOSITORY_URL}/blob/main/"
    for name, rule in rules_by_name().items():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(docs) and "#" in url, name
        path, anchor = url.removeprefix(docs).split("#", 1)
        assert anchor in doc_sections(ROOT / path), f"{name}: {path} has no heading for #{anchor}"
        if match := re.fullmatch(r'gradwatch_alert_active\{kind="(\w+)"\} == 1', rule["expr"]):
            kind = match.group(1)
            assert name == "Gradwatch" + "".join(word.capitalize() for word in kind.split("_"))
            assert rule["annotations"]["summary"] == f"Run {{{{ $labels.run }}}}: {runbook(kind).title} ({kind})"
            assert runbook(kind).hint in " ".join(rule["annotations"]["description"].split()), name
            assert url == runbook_url(kind)


def test_prometheus_only_rules_are_unit_tested() -> None:
    tested = {case["alertname"] for path in (PROMETHEUS / "tests").glob("*.yml")
              for test in load(path)["tests"] for case in test.get("alert_rule_test", [])}
    own = {r["alert"] for g in load(RULES)["groups"] if g["name"] == "gradwatch-prometheus" for r in g["rules"]}
    assert own <= tested
    assert tested - own, "at least one detector rule is tested too"


# --- Alertmanager -----------------------------------------------------------------------


@pytest.mark.parametrize("config", ["alertmanager.yml", "examples/slack.yml", "examples/email.yml"])
def test_amtool_check_config(config: str) -> None:
    run_tool(tool("amtool"), "check-config", str(ALERTMANAGER / config))


@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=GradwatchNonfinite", "run=r", "severity=critical"], "gradwatch-critical"),
    (["alertname=GradwatchPlateau", "run=r", "severity=warning"], "gradwatch-warning"),
    (["alertname=GradwatchUpdateRatio", "run=r", "severity=info"], "gradwatch-info"),
    (["alertname=GradwatchSomethingNew", "run=r"], "gradwatch-warning"),
])
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    output = run_tool(tool("amtool"), "config", "routes", "test",
                      f"--config.file={ALERTMANAGER / 'alertmanager.yml'}", *labels)
    assert output.split() == [receiver]


# --- gradwatch up's generated configs ----------------------------------------------------


def test_stack_configs_pass_promtool_and_amtool(tmp_path: Path) -> None:
    promtool, amtool = tool("promtool"), tool("amtool")
    prometheus_yml = tmp_path / "prometheus.yml"
    prometheus_yml.write_text(json.dumps(
        prometheus_config("127.0.0.1:9108", "127.0.0.1:9093", [str(RULES)], "1s")))
    run_tool(promtool, "check", "config", str(prometheus_yml))
    alertmanager_yml = tmp_path / "alertmanager.yml"
    alertmanager_yml.write_text(json.dumps(alertmanager_config("http://127.0.0.1:5001/hook", "1s")))
    run_tool(amtool, "check-config", str(alertmanager_yml))
    alertmanager_yml.write_text(json.dumps(alertmanager_config(None, "1s")))
    run_tool(amtool, "check-config", str(alertmanager_yml))


# --- Container image and docker-compose ----------------------------------------------------


def test_dockerfile_runs_the_collector_unprivileged_without_torch() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert final_stage.startswith("python:3.11-slim")
    assert re.search(r"^USER 10001", final_stage, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*/healthz", final_stage, re.MULTILINE | re.DOTALL)
    assert 'ENTRYPOINT ["gradwatch", "collector"]' in final_stage
    assert "torch" not in re.sub(r"#.*", "", dockerfile)  # comments may say why it is absent
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.MULTILINE | re.DOTALL)
    assert dependencies and "torch" not in dependencies.group(1)


def test_the_collector_and_the_stack_run_without_torch() -> None:
    """The image has no torch, so nothing the collector or `gradwatch up` imports may need it."""
    blocked = "import sys; sys.modules['torch'] = None; "
    modules = "import gradwatch.collector.cli, gradwatch.collector.server, gradwatch.stack, gradwatch.dashboards.cli"
    subprocess.run([sys.executable, "-c", blocked + modules], check=True, timeout=60)


def test_compose_mounts_exist_and_services_agree() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    # Grafana: dashboards mounted where the provider looks, datasource pointing at the service.
    provider = load(ROOT / "dashboards/provisioning/dashboards/gradwatch.yaml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["../dashboards"] == provider["options"]["path"]
    datasource = load(ROOT / "dashboards/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    # Prometheus: scrapes the collector service, alerts the alertmanager service.
    prometheus = load(PROMETHEUS / "prometheus.yml")
    scrape = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "gradwatch")
    assert scrape["static_configs"][0]["targets"] == ["collector:9108"]
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert "prometheus/rules:/etc/prometheus/rules:ro" in " ".join(services["prometheus"]["volumes"])


# --- Kubernetes --------------------------------------------------------------------------


def test_generated_k8s_manifests_are_in_sync() -> None:
    command = "gradwatch dashboards build --out dashboards --k8s deploy/k8s"
    files = dashboard_files()
    assert (K8S / k8s.DASHBOARDS_CONFIGMAP).read_text() == k8s.dashboards_configmap(files), f"run `{command}`"
    assert (K8S / k8s.PROMETHEUS_RULE).read_text() == k8s.prometheus_rule(RULES.read_text()), f"run `{command}`"
    # And they parse to what they embed.
    configmap = load(K8S / k8s.DASHBOARDS_CONFIGMAP)
    assert {name: json.loads(text) for name, text in configmap["data"].items()} == {
        name: json.loads(text) for name, text in files.items()}
    assert load(K8S / k8s.PROMETHEUS_RULE)["spec"] == load(RULES)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load(K8S / "kustomization.yaml")["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_k8s_collector_wiring() -> None:
    docs = load_all(K8S / "collector.yaml")
    statefulset = docs[("StatefulSet", "gradwatch-collector")]
    service = docs[("Service", "gradwatch")]
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # per-pod addresses for GRADWATCH_URL's list: a headless Service named by the StatefulSet
    assert service["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == "gradwatch"
    mounts = {m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]} <= mounts
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    monitor = load(K8S / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The job label the rules and the Fleet dashboard select on.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "gradwatch"


def test_k8s_collector_config_loads(tmp_path: Path) -> None:
    config_module = pytest.importorskip("gradwatch.collector.config", reason="the collector is not in this tree")
    docs = load_all(K8S / "collector.yaml")
    path = tmp_path / "collector.toml"
    path.write_text(docs[("ConfigMap", "gradwatch-collector")]["data"]["collector.toml"])
    config = config_module.load_config(path, environ={})
    assert config.metrics.layer_cap == 200
