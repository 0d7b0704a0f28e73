"""Cloud side of the post-quantum protection: the ``cloud ingest`` consumer.

:mod:`.verify` (sans-I/O verification), :mod:`.subscriber` (MQTT 5 / 3.1.1 over the project's
codec, acknowledgements on demand), :mod:`.sinks` (JSONL / SQLite output), :mod:`.state` (the
durable consumer state in SQLite: one transaction per chunk before its PUBACKs),
:mod:`.pgstore` (the same in PostgreSQL), :mod:`.audit` (the stored chain for ``audit verify
--db``), :mod:`.ingest` (the runner). docs/cloud.md.
"""
