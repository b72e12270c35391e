"""The collector: websocket ingest from probes, run registry, detectors, alert history and
Prometheus metrics.

The core (`registry`, `actions`, `metrics`) is pure: state in, events out, clock passed in.
`server` and `history` are the thin I/O shells around it. Nothing here imports torch.

Embedding one in a process (the demo, tests)::

    from gradwatch.collector.server import EmbeddedCollector
    with EmbeddedCollector() as collector:
        gradwatch.attach(model, optimizer, url=collector.ws_url)
"""
