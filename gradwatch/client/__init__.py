"""Clients of a collector: `gradwatch ingest` (replay.py) and `gradwatch runs` / `alerts`
(query.py). They talk to a collector over its ports and import nothing of it."""
