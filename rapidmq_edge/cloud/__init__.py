"""Cloud side of the post-quantum protection: the ``cloud ingest`` consumer.

:mod:`.verify` (sans-I/O verification), :mod:`.subscriber` (MQTT 5 over the project's codec),
:mod:`.sinks` (JSONL / SQLite output), :mod:`.ingest` (the runner).
"""
