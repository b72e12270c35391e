"""Grafana dashboards generated from code (`gradwatch dashboards build`)."""

from gradwatch.dashboards.boards import all_dashboards
from gradwatch.dashboards.panels import DATASOURCE_UID

__all__ = ["DATASOURCE_UID", "all_dashboards"]
