"""`gradwatch dashboards build | push`: write the dashboards JSON, or upload it to Grafana.

    gradwatch dashboards build --out dashboards --k8s deploy/k8s   # regenerate the committed files
    gradwatch dashboards push --url http://grafana:3000 --token $GRAFANA_TOKEN --folder gradwatch
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from gradwatch.dashboards import k8s
from gradwatch.dashboards.boards import all_dashboards
from gradwatch.dashboards.panels import DATASOURCE_VARIABLE
from gradwatch.dashboards.schema import Dashboard, VariableOption

DEFAULT_RULES = Path("deploy/prometheus/rules/gradwatch.rules.yml")


class PushError(Exception):
    """A failure to upload, with a message that says what to do about it."""


def dashboard_files() -> dict[str, str]:
    """File name -> exact JSON text of every dashboard."""
    return {f"{d.uid}.json": d.to_json() for d in all_dashboards()}


def build(out: Path, k8s_dir: Path | None = None, rules: Path = DEFAULT_RULES) -> list[Path]:
    """Write the dashboards (and, with `k8s_dir`, the manifests embedding them); return the paths."""
    files = dashboard_files()
    written = {out / name: text for name, text in files.items()}
    if k8s_dir is not None:
        written[k8s_dir / k8s.DASHBOARDS_CONFIGMAP] = k8s.dashboards_configmap(files)
        written[k8s_dir / k8s.PROMETHEUS_RULE] = k8s.prometheus_rule(rules.read_text())
    for path, text in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(written)


def with_datasource(dashboard: Dashboard, uid: str) -> Dashboard:
    """The dashboard with its datasource variable defaulting to `uid`."""
    variables = [
        v.model_copy(update={"current": VariableOption(text=uid, value=uid)}) if v.name == DATASOURCE_VARIABLE else v
        for v in dashboard.templating.list
    ]
    return dashboard.model_copy(update={"templating": dashboard.templating.model_copy(update={"list": variables})})


def push(url: str, token: str | None, folder: str, datasource: str | None = None, timeout: float = 10.0) -> list[str]:
    """Create or overwrite every dashboard in `folder` (created when missing); return their URLs."""
    from grafana_client import GrafanaApi
    from grafana_client.client import (
        GrafanaClientError,
        GrafanaException,
        GrafanaUnauthorizedError,
    )

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    try:
        folder_uid = _ensure_folder(api, folder)
        urls = []
        for dashboard in all_dashboards():
            if datasource:
                dashboard = with_datasource(dashboard, datasource)
            payload: dict[str, Any] = {
                "dashboard": dashboard.model_dump(mode="json", by_alias=True, exclude_none=True),
                "folderUid": folder_uid,
                "overwrite": True,
                "message": "gradwatch dashboards push",
            }
            answer = api.dashboard.update_dashboard(payload)
            urls.append(url.rstrip("/") + str(answer.get("url", f"/d/{dashboard.uid}")))
        return urls
    except GrafanaUnauthorizedError:
        hint = "the token was rejected" if token else "no token given (pass --token or set GRAFANA_TOKEN)"
        raise PushError(f"Grafana at {url} refused the request with 401 Unauthorized: {hint}") from None
    except GrafanaClientError as err:
        if err.status_code == 403:
            raise PushError(
                f"Grafana at {url} answered 403 Forbidden: the token needs the Editor role "
                "(dashboards:write and folders:create) in this organization"
            ) from None
        raise PushError(f"Grafana at {url} rejected the upload: {err.message}") from None
    except GrafanaException as err:  # server errors and timeouts
        raise PushError(f"Grafana at {url} failed: {err.message}") from None
    except OSError as err:  # connection refused, DNS, TLS: the HTTP client's errors are OSErrors
        raise PushError(f"cannot reach Grafana at {url}: {err}") from None


def _ensure_folder(api: Any, title: str) -> str:
    for existing in api.folder.get_all_folders():
        if existing.get("title") == title:
            return str(existing["uid"])
    uid = re.sub(r"[^A-Za-z0-9_-]+", "-", title).strip("-")[:40] or "gradwatch"
    return str(api.folder.create_folder(title, uid=uid)["uid"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dashboards_command", metavar="{build,push}", required=True)
    build_p = sub.add_parser("build", help="write the dashboards JSON (and the Kubernetes manifests embedding it)")
    build_p.add_argument("--out", type=Path, default=Path("dashboards"),
                         help="directory for the JSON files (default: dashboards)")
    build_p.add_argument("--k8s", type=Path, metavar="DIR",
                         help="also write the dashboards ConfigMap and the PrometheusRule into DIR (e.g. deploy/k8s)")
    build_p.add_argument("--rules", type=Path, default=DEFAULT_RULES,
                         help=f"the Prometheus rules file the PrometheusRule embeds (default: {DEFAULT_RULES})")
    push_p = sub.add_parser("push", help="create or update the dashboards in a Grafana through its HTTP API")
    push_p.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://localhost:3000")
    push_p.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                        help="service account token with the Editor role (default: $GRAFANA_TOKEN)")
    push_p.add_argument("--folder", default="gradwatch", help="Grafana folder title (default: gradwatch)")
    push_p.add_argument("--datasource", metavar="UID",
                        help="uid of the Prometheus datasource to select by default (default: gradwatch-prometheus)")


def main(args: argparse.Namespace) -> int:
    """Build the Grafana dashboards from code, or push them to a Grafana.

    build   writes dashboards/*.json (committed; a test checks they match the code)
    push    uploads them to Grafana with grafana-client, overwriting earlier versions
    """
    if args.dashboards_command == "build":
        if args.k8s is not None and not args.rules.is_file():
            print(f"error: rules file {args.rules} not found (run from the repository root or pass --rules)",
                  file=sys.stderr)
            return 2
        for path in build(args.out, args.k8s, args.rules):
            print(f"wrote {path}")
        return 0
    try:
        urls = push(args.url, args.token, args.folder, args.datasource)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for dashboard_url in urls:
        print(f"pushed {dashboard_url}")
    return 0
