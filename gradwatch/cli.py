"""`gradwatch` command line: one subcommand per module, imported only when used
(so `gradwatch collector` never imports torch)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> ("module" or "module:prefix", one-line help). The module defines
#   add_arguments(parser) / main(args) -> int, or {prefix}_arguments / {prefix}_main.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gradwatch.demo", "run short real trainings with injected pathologies against an embedded collector"),
    "collector": ("gradwatch.collector.cli", "start the collector daemon (websocket ingest, detectors, /metrics)"),
    "runs": ("gradwatch.client.query:runs", "list the runs a collector knows"),
    "alerts": ("gradwatch.client.query:alerts", "show the alert history of a collector, optionally for one run"),
    "report": ("gradwatch.client.report", "write a run's page (curves, gradient flow, alerts) as one HTML file"),
    "ingest": ("gradwatch.client.replay", "replay an offline JSONL spool (GRADWATCH_URL=file:PATH) into a collector"),
    "dashboards": ("gradwatch.dashboards.cli", "build or push the Grafana dashboards"),
    "up": ("gradwatch.stack", "start collector + Prometheus + Alertmanager on this machine (no containers)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Training diagnostics for PyTorch. Attach the probe in training with "
        "`gradwatch.attach(model, optimizer)`; run the collector with `gradwatch collector`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if argv and argv[0] != name and argv[0] not in ("-h", "--help"):
            sub.add_parser(name, help=help_text)  # only the chosen command's module is imported
            continue
        module_path, _, prefix = module_name.partition(":")
        module = importlib.import_module(module_path)
        add_arguments = getattr(module, f"{prefix}_arguments" if prefix else "add_arguments")
        run = getattr(module, f"{prefix}_main" if prefix else "main")
        p = sub.add_parser(name, help=help_text, description=(run.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        p.set_defaults(_main=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
