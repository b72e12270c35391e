"""Run pages kept in the data directory: one JSON file per run (`RunSeries.to_json`), so a
finished run's page still draws after a collector restart.

Written when a run ends and at shutdown (not every few seconds: a page's history is up to
about a megabyte of JSON), atomically (a temporary file renamed over the old one), so a
crash mid-write leaves the previous version. A file that cannot be read or parsed is logged
and treated as absent: the run's alerts are still in the history.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gradwatch.collector.series import RunSeries

log = logging.getLogger("gradwatch.collector")

SERIES_DIR = "series"


class SeriesStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / SERIES_DIR

    def _file(self, run: str) -> Path:
        # Run names are validated by the protocol (no "/", never starting with "."): a plain file name.
        return self.path / f"{run}.json"

    def save(self, run: str, series: RunSeries) -> None:
        """Raises OSError (the caller logs it: a failing disk must not stop ingest)."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self._file(run)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(json.dumps(series.to_json(), separators=(",", ":"), allow_nan=False), encoding="utf-8")
        os.replace(partial, target)

    def load(self, run: str) -> RunSeries | None:
        target = self._file(run)
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
            return RunSeries.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as err:  # AttributeError: JSON that is not an object
            log.warning("cannot read the page history of run %s from %s: %s", run, target, err)
            return None

    def delete(self, runs: list[str]) -> None:
        for run in runs:
            try:
                self._file(run).unlink(missing_ok=True)
            except OSError as err:
                log.warning("cannot delete the page history of run %s: %s", run, err)
