"""What a simulated run contains: the knobs of the fleet generator and the records it emits.

Everything here is plain data. Times are *simulated* seconds from the start of the run;
the fleet runner maps them to wall-clock time with its time-scale factor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rapidmq_edge.intelligence.features import ANOMALY_LABELS, PRIORITY_LABELS, THREAT_LABELS

#: device kinds the generator knows, with their share of the fleet
DEVICE_KINDS: tuple[str, ...] = ("temperature", "vibration", "power", "door", "alarm", "log")
SENSOR_KINDS: tuple[str, ...] = ("temperature", "vibration", "power")
#: priority classes (most urgent first), fault kinds ("none" = healthy reading) and
#: client-behaviour labels ("benign" first), in the order of the models' outputs
PRIORITIES = PRIORITY_LABELS
FAULTS = ANOMALY_LABELS
THREATS = THREAT_LABELS


@dataclass(frozen=True)
class Scenario:
    """Parameters of one simulated run; equal scenarios generate identical runs."""

    seed: int = 1
    devices: int = 100
    duration: float = 3600.0
    #: wall-clock epoch of simulated second 0 (put in the payloads' ``ts``)
    start_epoch: float = 1_700_000_000.0
    #: share of devices speaking CoAP (CBOR payloads) instead of MQTT (JSON/text)
    coap_fraction: float = 0.0
    #: relative weights of DEVICE_KINDS
    kind_weights: tuple[float, ...] = (0.3, 0.2, 0.2, 0.1, 0.08, 0.12)
    #: expected injected faults per sensor stream and simulated hour
    fault_rate: float = 2.0
    #: expected outages (disconnect, silence, reconnect) per device and hour
    outage_rate: float = 0.3
    #: misbehaving clients (credential guessing, topic scanning, floods, in turn)
    attackers: int = 0
    #: benign clients that retry a wrong password now and then (a classic false positive)
    misconfigured: int = 0
    #: benign dashboards that subscribe to broad filters once
    dashboards: int = 0
    #: multiplies every device's reporting period (1 = realistic rates)
    period_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (recorded beside every run)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SimMessage:
    """One publication of a simulated device, with its ground truth."""

    t: float
    device: str
    kind: str
    protocol: str  # "mqtt" | "coap"
    topic: str
    payload: bytes
    content_format: str  # "json" | "cbor" | "text"
    qos: int
    retain: bool
    seq: int
    priority: str
    fault: str = "none"
    #: a fault's first readings that cannot be told from healthy ones yet: scored neither
    #: as a hit nor as a miss
    grace: bool = False
    #: the sensor reading carried in the payload (None for events, logs and bulk reports)
    value: float | None = None

    def label(self) -> dict[str, Any]:
        """The ground-truth record written to ``labels.jsonl``."""
        return {"t": round(self.t, 6), "device": self.device, "topic": self.topic,
                "seq": self.seq, "kind": self.kind, "protocol": self.protocol,
                "priority": self.priority, "fault": self.fault, "grace": self.grace}


@dataclass(frozen=True, slots=True)
class ClientAction:
    """One thing a client does to the broker, with the client's ground-truth label.

    ``action``: "connect" (``ok`` False = refused credentials), "disconnect", "publish"
    (``ok`` False = expected to be refused by the ACL), "subscribe".
    """

    t: float
    client: str
    action: str
    label: str = "benign"
    ok: bool = True
    topic: str = ""
    size: int = 0
    username: str | None = None
    password: str | None = None
    #: the publication itself, for actions that replay a device message
    message: SimMessage | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Outage:
    """A device is offline (disconnected, silent) during ``[start, end)``."""

    device: str
    start: float
    end: float
    reason: str  # "network" | "maintenance"


@dataclass
class FleetRun:
    """Everything one scenario produced, sorted by time."""

    scenario: Scenario
    devices: dict[str, dict[str, Any]]
    messages: list[SimMessage]
    actions: list[ClientAction]
    outages: list[Outage]
