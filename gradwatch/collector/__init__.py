"""The collector: websocket ingest from probes, run registry, detectors, alert history and
Prometheus metrics.

The core (`registry`, `actions`, `metrics`) is pure: state in, events out, clock passed in.
The thin I/O shells around it: `connections` (one probe's websocket), `effects` (what the
registry's events do), `http_api` (read-only HTTP), `history` (SQLite), and `server`, which
wires them to the ports. Nothing here imports torch.

Embedding one in a process (the demo, tests)::

    from gradwatch.collector.embedded import EmbeddedCollector
    with EmbeddedCollector() as collector:
        gradwatch.attach(model, optimizer, url=collector.ws_url)
"""
