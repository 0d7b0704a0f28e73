"""RapidMQ Edge: an asyncio IoT edge gateway with its own MQTT 3.1.1/5.0 broker core.

Messages flow ingress -> pipeline -> store -> uplink. The MQTT protocol itself is
implemented sans-I/O in :mod:`rapidmq_edge.mqtt`; asyncio listeners live in
:mod:`rapidmq_edge.ingress` and broker logic in :mod:`rapidmq_edge.broker`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
