"""Benchmarks (run as scripts, e.g. ``python3 bench/mqtt_throughput.py --quick``)."""
