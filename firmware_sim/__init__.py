"""Simulated device fleet for RapidMQ Edge: demos, model training data and load tests.

- :mod:`.scenario`: the knobs (:class:`Scenario`) and records (messages, client actions,
  outages) of a run;
- :mod:`.generator`: the pure, seeded generator (:func:`generate`), no I/O;
- :mod:`.datasets`: feature matrices and labels for the three models;
- :mod:`.quality`: metrics and onnxruntime cost against the ground truth;
- :mod:`.runner`: the asyncio replay over MQTT (own codec) and CoAP (aiocoap);
- :mod:`.cli`: ``python -m firmware_sim`` / ``rapidmq-edge-sim``.
"""

from .generator import generate
from .scenario import ClientAction, FleetRun, Outage, Scenario, SimMessage

__all__ = ["ClientAction", "FleetRun", "Outage", "Scenario", "SimMessage", "generate"]
