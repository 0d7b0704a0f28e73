"""Pure, seeded telemetry generator: a :class:`Scenario` in, a :class:`FleetRun` out (no I/O).

Each device draws from its own random stream (``numpy.random.default_rng([seed, index])``),
so a run is identical for equal scenarios and a device's timeline does not depend on the
others. The ground truth produced with every message:

* **priority** follows the firmware semantics: alarms of severity critical, forced doors,
  over-limit alerts and CRITICAL log lines are ``critical``; door events, alarm troubles and
  clears, WARN/ERROR log lines are ``high``; periodic readings and INFO lines are ``normal``;
  heartbeats, battery states, spectra, energy/statistics reports and DEBUG lines are ``bulk``.
* **fault** of sensor readings (temperature, vibration, power):

  - ``spike``: one reading off by 6-15 sigma of the sensor noise;
  - ``stuck``: the sensor repeats one value 12-40 times; the first two repeats are *grace*
    (a healthy sensor repeats a quantised value now and then);
  - ``drift``: the reading runs away at 0.2-0.6 sigma per sample for 40-120 samples, then
    the device goes offline for maintenance (recalibration); readings whose offset is still
    below 5 sigma are *grace*;
  - ``burst``: the device chatters, 10-40 readings at 8-25 times its normal rate (the
    first one, at the regular time, is *grace*).

  Faults start only once a stream has 40 readings since its last long gap (the detectors'
  warm-up). Grace readings are neither hits nor misses in the quality measurements.
* **client label** of every broker action: devices, misconfigured clients (a wrong password
  retried every 15-60 s) and dashboards are ``benign``; attackers are
  ``credential_guessing``, ``topic_scanning`` or ``flood`` while they act.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import cbor2
import numpy as np

from .scenario import (
    DEVICE_KINDS,
    THREATS,
    ClientAction,
    FleetRun,
    Outage,
    Scenario,
    SimMessage,
)

DAY = 86_400.0
#: readings a stream needs (after a start or a long gap) before a fault may be injected
WARMUP_READINGS = 40
#: a gap longer than this many periods counts as a reset of the stream
RESET_GAP_PERIODS = 10.0

_KIND_TOKENS = {
    "temperature": ("temperature", "temp", "thermo"),
    "vibration": ("vibration", "vib", "accel"),
    "power": ("power", "meter", "energy"),
    "door": ("door", "access"),
    "alarm": ("alarm", "panel"),
    "log": ("log", "syslog"),
}
_LEAVES = {
    "reading": ("reading", "telemetry", "data", "state"),
    "alert": ("alert", "event"),
    "bulk": ("bulk", "report", "batch"),
    "event": ("event", "evt"),
    "status": ("status", "heartbeat"),
    "log": ("log", "lines"),
}
_ID_PREFIXES = ("dev", "node", "esp", "sn")
_UNITS = {"temperature": "C", "vibration": "mm/s", "power": "W"}
_PERIODS = {"temperature": 30.0, "vibration": 10.0, "power": 15.0}

_LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")
_LOG_LEVEL_P = (0.45, 0.35, 0.10, 0.08, 0.02)
_LOG_PRIORITY = {"DEBUG": "bulk", "INFO": "normal", "WARN": "high", "ERROR": "high",
                 "CRITICAL": "critical"}
_LOG_TEXT = {
    "DEBUG": ("poll cycle {n} took {v} ms", "error counter={n}", "rx buffer {n} bytes",
              "alarm zone scan {n} idle"),
    "INFO": ("alarm panel self-test passed", "firmware {n}.{v} running", "connected to gateway",
             "config reloaded ({n} keys)", "door controller sync ok"),
    "WARN": ("battery low ({n} %)", "retrying upstream ({n})", "clock skew {v} ms",
             "door held open {n} s"),
    "ERROR": ("sensor read failed (code {n})", "write to flash failed", "modbus timeout {n}",
              "pump {n} overcurrent"),
    "CRITICAL": ("watchdog reset imminent", "overtemperature shutdown", "fire relay fault",
                 "power supply failure"),
}
#: spikes are one reading each, so they are drawn more often than the longer faults
_FAULT_P = (0.2, 0.4, 0.2, 0.2)
_USERNAMES = ("admin", "root", "user", "test", "mqtt", "guest", "pi", "operator", "device",
              "support", "ubnt", "iot")


# --------------------------------------------------------------------------- helpers


def _choice(rng: np.random.Generator, items: tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def _encode(body: dict[str, Any], fmt: str) -> bytes:
    if fmt == "cbor":
        return bytes(cbor2.dumps(body))
    return json.dumps(body, separators=(",", ":")).encode()


def _poisson_times(rng: np.random.Generator, rate_per_hour: float, duration: float) -> list[float]:
    n = int(rng.poisson(max(rate_per_hour, 0.0) * duration / 3600.0))
    return sorted(float(v) for v in rng.uniform(0.0, duration, n))


def _topics(rng: np.random.Generator, dev: str, kind: str, site: int) -> dict[str, str]:
    """Topic names of one device, in one of three vendor naming styles."""
    style = int(rng.integers(3))
    tok = _choice(rng, _KIND_TOKENS[kind])
    leaves = {k: _choice(rng, v) for k, v in _LEAVES.items()}
    if style == 0:
        base = f"site/s{site:02d}/{tok}/{dev}"
    elif style == 1:
        base = f"plant{site % 4}/line{site % 7}/{tok}/{dev}"
    else:
        base = f"devices/{dev}/{tok}"
    return {k: f"{base}/{v}" for k, v in leaves.items()}


class _Emitter:
    """Collects one device's messages (format, sequence numbers, timestamps)."""

    def __init__(self, sc: Scenario, dev: dict[str, Any]) -> None:
        self.sc = sc
        self.dev = dev
        self.seq = 0
        self.out: list[SimMessage] = []

    def json_like(self, t: float, leaf: str, body: dict[str, Any], priority: str, *,
                  qos: int = 0, retain: bool = False, fault: str = "none", grace: bool = False,
                  value: float | None = None) -> None:
        fmt = "cbor" if self.dev["protocol"] == "coap" else "json"
        full = {"ts": round(self.sc.start_epoch + t, 3), "seq": self.seq, **body}
        self._add(t, leaf, _encode(full, fmt), fmt, priority, qos, retain, fault, grace, value)

    def text(self, t: float, leaf: str, line: str, priority: str) -> None:
        self._add(t, leaf, line.encode(), "text", priority, 0, False, "none", False, None)

    def _add(self, t: float, leaf: str, payload: bytes, fmt: str, priority: str, qos: int,
             retain: bool, fault: str, grace: bool, value: float | None) -> None:
        d = self.dev
        self.out.append(SimMessage(
            t=t, device=d["id"], kind=d["kind"], protocol=d["protocol"],
            topic=d["topics"][leaf], payload=payload, content_format=fmt, qos=qos,
            retain=retain, seq=self.seq, priority=priority, fault=fault, grace=grace,
            value=value))
        self.seq += 1


# --------------------------------------------------------------------------- device kinds


def _sensor(rng: np.random.Generator, sc: Scenario, dev: dict[str, Any],
            outages: list[Outage]) -> list[SimMessage]:
    kind = dev["kind"]
    period = _PERIODS[kind] * sc.period_scale
    if kind == "temperature":
        base, sigma = rng.uniform(15, 30), rng.uniform(0.08, 0.2)
        amp, quantum = sigma * rng.uniform(5, 25), 0.01
    elif kind == "vibration":
        base = rng.uniform(0.5, 3.0)
        sigma, amp, quantum = 0.05 * base, 0.2 * base, 0.001
    else:
        base = rng.uniform(200, 2000)
        sigma, amp, quantum = 0.01 * base, 0.3 * base * rng.uniform(0.3, 1.0), 0.1
    decimals = max(0, -int(math.floor(math.log10(quantum))))
    phase = rng.uniform(0, DAY)
    dev.update(period=period, sigma=round(sigma, 6), unit=_UNITS[kind])
    em = _Emitter(sc, dev)

    def clean(t: float) -> float:
        return float(base + amp * math.sin(2 * math.pi * (sc.start_epoch + t + phase) / DAY))

    def reading(t: float, x: float, fault: str = "none", grace: bool = False) -> float:
        xq = round(round(x / quantum) * quantum, decimals)
        em.json_like(t, "reading", {"value": xq, "unit": dev["unit"]}, "normal",
                     fault=fault, grace=grace, value=xq)
        return xq

    net = [(s, s + rng.uniform(30, 600)) for s in _poisson_times(rng, sc.outage_rate, sc.duration)]
    pending = _poisson_times(rng, sc.fault_rate, sc.duration)
    t = float(rng.uniform(0, period))
    since_reset = 0
    n_read = 0
    while t < sc.duration:
        if net and t >= net[0][0]:
            start, end = net.pop(0)
            outages.append(Outage(dev["id"], start, end, "network"))
            if end - start > RESET_GAP_PERIODS * period:
                since_reset = 0
            t = end + float(rng.uniform(0, period))
            continue
        if pending and t >= pending[0] and since_reset >= WARMUP_READINGS:
            pending.pop(0)
            fault = ("drift", "spike", "stuck", "burst")[int(rng.choice(4, p=_FAULT_P))]
            t, reset = _inject(rng, fault, t, period, sigma, clean, reading, sc.duration)
            n_read += 1
            if reset:  # drift: the device goes offline for recalibration
                gap = max(rng.uniform(300, 1200), (RESET_GAP_PERIODS + 2) * period)
                outages.append(Outage(dev["id"], t, t + gap, "maintenance"))
                t += gap + float(rng.uniform(0, period))
                since_reset = 0
                net = [o for o in net if o[0] >= t]
            continue
        reading(t, clean(t) + rng.normal(0, sigma))
        since_reset += 1
        n_read += 1
        if rng.random() < 0.002:
            em.json_like(t + 0.05, "alert", {"alert": "over_limit", "measured": round(clean(t)
                         + 8 * sigma, decimals), "severity": "critical"}, "critical", qos=1)
        if n_read % {"temperature": 120, "vibration": 30, "power": 60}[kind] == 0:
            em.json_like(t + 0.1, "bulk", _bulk_body(rng, kind, clean(t), sigma, decimals),
                         "bulk")
        t += period * float(rng.normal(1.0, 0.03))
    return em.out


def _bulk_body(rng: np.random.Generator, kind: str, level: float, sigma: float,
               decimals: int) -> dict[str, Any]:
    if kind == "vibration":
        return {"spectrum": [round(float(v), 4) for v in np.abs(rng.normal(0, sigma, 64))],
                "fs": 3200}
    if kind == "power":
        return {"kwh": round(level * 0.25 / 1000, 4), "interval": 900}
    lo, hi = level - 2 * sigma, level + 2 * sigma
    return {"stats": {"min": round(lo, decimals), "max": round(hi, decimals),
                      "mean": round(level, decimals), "n": 120}}


def _inject(rng: np.random.Generator, fault: str, t: float, period: float, sigma: float,
            clean: Any, reading: Any, duration: float) -> tuple[float, bool]:
    """Emit one fault's readings from ``t``; returns (next time, whether a reset follows)."""
    if fault == "spike":
        sign = 1 if rng.random() < 0.5 else -1
        reading(t, clean(t) + rng.normal(0, sigma) + sign * rng.uniform(6, 15) * sigma, "spike")
        return t + period * float(rng.normal(1.0, 0.03)), False
    if fault == "stuck":
        frozen = None
        for k in range(int(rng.integers(12, 41))):
            if t >= duration:
                break
            x = clean(t) + rng.normal(0, sigma) if frozen is None else frozen
            frozen = reading(t, x, "stuck", grace=k < 2)
            t += period * float(rng.normal(1.0, 0.03))
        return t, False
    if fault == "drift":
        slope = rng.uniform(0.2, 0.6) * (1 if rng.random() < 0.5 else -1)
        for k in range(int(rng.integers(40, 121))):
            if t >= duration:
                break
            offset = slope * (k + 1)
            reading(t, clean(t) + rng.normal(0, sigma) + offset * sigma, "drift",
                    grace=abs(offset) < 5.0)
            t += period * float(rng.normal(1.0, 0.03))
        return t, True
    # burst: chattering at 8-25x the normal rate
    step = period / rng.uniform(8, 25)
    for k in range(int(rng.integers(10, 41))):
        if t >= duration:
            break
        # the first reading comes at the regular time: it cannot be told from a healthy one
        reading(t, clean(t) + rng.normal(0, sigma), "burst", grace=k == 0)
        t += step * float(rng.uniform(0.8, 1.2))
    return t + period, False


def _door(rng: np.random.Generator, sc: Scenario, dev: dict[str, Any],
          outages: list[Outage]) -> list[SimMessage]:
    em = _Emitter(sc, dev)
    door = f"d{int(rng.integers(1, 9))}"
    t_status = float(rng.uniform(0, 600))
    t = float(rng.exponential(90.0))
    battery = int(rng.integers(40, 101))
    while min(t, t_status) < sc.duration:
        if t_status <= t:
            em.json_like(t_status, "status", {"battery": battery, "door": door}, "bulk",
                         retain=True)
            t_status += 600.0
            continue
        r = rng.random()
        if r < 0.02:
            em.json_like(t, "event", {"event": "forced", "door": door}, "critical", qos=1)
        elif r < 0.10:
            em.json_like(t, "event", {"event": "held_open", "door": door,
                                      "seconds": int(rng.integers(30, 300))}, "high", qos=1)
        else:
            em.json_like(t, "event", {"event": "open" if r < 0.55 else "close", "door": door},
                         "high", qos=1)
        t += float(rng.exponential(90.0))
    return em.out


def _alarm(rng: np.random.Generator, sc: Scenario, dev: dict[str, Any],
           outages: list[Outage]) -> list[SimMessage]:
    em = _Emitter(sc, dev)
    zones = int(rng.integers(4, 17))
    t_hb = float(rng.uniform(0, 60))
    t = float(rng.exponential(600.0))
    while min(t, t_hb) < sc.duration:
        if t_hb <= t:
            em.json_like(t_hb, "status", {"status": "ok", "zones": zones, "armed": True}, "bulk",
                         retain=True)
            t_hb += 60.0
            continue
        r = rng.random()
        zone = int(rng.integers(1, zones + 1))
        if r < 0.3:
            kind = _choice(rng, ("smoke", "fire", "intrusion", "flood", "gas"))
            em.json_like(t, "event", {"event": "alarm", "type": kind, "zone": zone,
                                      "severity": "critical"}, "critical", qos=1)
        elif r < 0.7:
            kind = _choice(rng, ("trouble", "tamper", "low_battery"))
            em.json_like(t, "event", {"event": kind, "zone": zone, "severity": "warning"},
                         "high", qos=1)
        else:
            em.json_like(t, "event", {"event": "cleared", "zone": zone, "severity": "info"},
                         "high", qos=1)
        t += float(rng.exponential(600.0))
    return em.out


def _log(rng: np.random.Generator, sc: Scenario, dev: dict[str, Any],
         outages: list[Outage]) -> list[SimMessage]:
    em = _Emitter(sc, dev)
    module = _choice(rng, ("pumpctl", "hvac", "doorctl", "meter", "fwupd", "netmgr"))
    t = float(rng.exponential(15.0))
    while t < sc.duration:
        level = _LOG_LEVELS[int(rng.choice(len(_LOG_LEVELS), p=_LOG_LEVEL_P))]
        text = _choice(rng, _LOG_TEXT[level]).format(n=int(rng.integers(0, 1000)),
                                                     v=int(rng.integers(0, 100)))
        stamp = _iso(sc.start_epoch + t)
        line = f"{stamp} {level} {module}[{em.seq}]: {text}"
        em.text(t, "log", line, _LOG_PRIORITY[level])
        t += float(rng.exponential(15.0))
    return em.out


def _iso(epoch: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(epoch, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


_KIND_FUNCS = {"temperature": _sensor, "vibration": _sensor, "power": _sensor, "door": _door,
               "alarm": _alarm, "log": _log}


# --------------------------------------------------------------------------- clients


def _device_actions(dev: dict[str, Any], msgs: list[SimMessage], outages: list[Outage],
                    jitter: float) -> list[ClientAction]:
    cid, user, pw = dev["id"], dev["id"], f"pw-{dev['id']}"
    acts = [ClientAction(min(jitter, msgs[0].t if msgs else jitter), cid, "connect",
                         username=user, password=pw)]
    for o in outages:
        acts.append(ClientAction(o.start, cid, "disconnect"))
        acts.append(ClientAction(o.end, cid, "connect", username=user, password=pw))
    acts.extend(ClientAction(m.t, cid, "publish", topic=m.topic, size=len(m.payload), message=m)
                for m in msgs)
    return acts


def _misconfigured(rng: np.random.Generator, sc: Scenario, i: int) -> list[ClientAction]:
    cid = f"legacy{i:03d}"
    out: list[ClientAction] = []
    t = float(rng.uniform(0, 30))
    while t < sc.duration:
        out.append(ClientAction(t, cid, "connect", ok=False, username=f"legacy{i:03d}",
                                password="old-secret"))
        t += float(rng.uniform(15, 60))
    return out


def _dashboard(rng: np.random.Generator, sc: Scenario, i: int) -> list[ClientAction]:
    cid = f"dashboard{i:02d}"
    t = float(rng.uniform(0, min(10.0, sc.duration / 4)))
    out = [ClientAction(t, cid, "connect", username="dashboard", password="dash")]
    for k, filt in enumerate(("#", "$SYS/#", "site/+/+/+/alert", "devices/+/+/event")):
        out.append(ClientAction(t + 0.01 * (k + 1), cid, "subscribe", topic=filt))
    return out


def _attacker(rng: np.random.Generator, sc: Scenario, i: int,
              device_topics: list[str]) -> list[ClientAction]:
    label = THREATS[1 + i % 3]
    cid = f"x{int(rng.integers(1 << 30)):08x}"
    start = float(rng.uniform(0, sc.duration * 0.6))
    out: list[ClientAction] = []
    if label == "credential_guessing":
        end = min(sc.duration, start + rng.uniform(30, 300))
        rate = float(np.exp(rng.uniform(np.log(0.4), np.log(30.0))))
        t = start
        while t < end:
            out.append(ClientAction(t, cid, "connect", label, ok=False,
                                    username=_choice(rng, _USERNAMES),
                                    password=f"{int(rng.integers(1 << 32)):08x}"))
            t += float(rng.exponential(1.0 / rate))
        return out
    if label == "topic_scanning":
        end = min(sc.duration, start + rng.uniform(20, 240))
        rate = float(np.exp(rng.uniform(np.log(1.0), np.log(30.0))))
        out.append(ClientAction(start, cid, "connect", label, username="guest", password="guest"))
        t = start + 0.05
        scans = ("#", "+/#", "$SYS/#", "+/+/+", "site/#", "devices/#", "cmd/#", "$share/g/#")
        while t < end:
            if rng.random() < 0.5:
                topic = (_choice(rng, scans) if rng.random() < 0.4
                         else _choice(rng, tuple(device_topics)) if device_topics else "a/b")
                out.append(ClientAction(t, cid, "subscribe", label, ok=rng.random() < 0.5,
                                        topic=topic))
            else:
                num = int(rng.integers(10000))
                topic = f"cmd/{num:04d}/{_choice(rng, ('reboot', 'ota', 'cfg'))}"
                out.append(ClientAction(t, cid, "publish", label, ok=rng.random() < 0.4,
                                        topic=topic, size=int(rng.integers(2, 64))))
            t += float(rng.exponential(1.0 / rate))
        return out
    # flood: a publish flood (70 %) or a reconnect storm (30 %)
    end = min(sc.duration, start + rng.uniform(10, 60))
    out.append(ClientAction(start, cid, "connect", label, username="guest", password="guest"))
    t = start + 0.05
    if rng.random() < 0.7:
        rate = float(np.exp(rng.uniform(np.log(60.0), np.log(600.0))))
        size = int(rng.integers(16, 2049))
        topics = [f"spam/{cid}/{k}" for k in range(int(rng.integers(1, 4)))]
        while t < end:
            out.append(ClientAction(t, cid, "publish", label, topic=_choice(rng, tuple(topics)),
                                    size=size))
            t += float(rng.exponential(1.0 / rate))
    else:
        rate = float(rng.uniform(5, 30))
        while t < end:
            out.append(ClientAction(t, cid, "disconnect", label))
            out.append(ClientAction(t + 0.001, cid, "connect", label, username="guest",
                                    password="guest"))
            t += float(rng.exponential(1.0 / rate))
    return out


# --------------------------------------------------------------------------- the run


def generate(sc: Scenario) -> FleetRun:
    """Generate the whole run of ``sc`` (deterministic: equal scenarios, equal runs)."""
    fleet_rng = np.random.default_rng([sc.seed, 0xF1EE7])
    weights = np.asarray(sc.kind_weights, dtype=float)
    kinds = fleet_rng.choice(len(DEVICE_KINDS), size=sc.devices, p=weights / weights.sum())
    n_coap = int(round(sc.coap_fraction * sc.devices))
    coap = (set(fleet_rng.choice(sc.devices, size=n_coap, replace=False).tolist())
            if n_coap else set())
    devices: dict[str, dict[str, Any]] = {}
    messages: list[SimMessage] = []
    actions: list[ClientAction] = []
    outages: list[Outage] = []
    for i in range(sc.devices):
        rng = np.random.default_rng([sc.seed, 1, i])
        kind = DEVICE_KINDS[int(kinds[i])]
        dev_id = f"{_choice(rng, _ID_PREFIXES)}{i:04d}"
        dev: dict[str, Any] = {"id": dev_id, "kind": kind,
                               "protocol": "coap" if i in coap else "mqtt",
                               "topics": _topics(rng, dev_id, kind, int(rng.integers(1, 40)))}
        dev_outages: list[Outage] = []
        msgs = _KIND_FUNCS[kind](rng, sc, dev, dev_outages)
        if kind not in ("temperature", "vibration", "power"):
            # event devices: network outages drop their messages
            for s in _poisson_times(rng, sc.outage_rate, sc.duration):
                dev_outages.append(Outage(dev_id, s, s + float(rng.uniform(30, 600)), "network"))
            msgs = [m for m in msgs if not any(o.start <= m.t < o.end for o in dev_outages)]
        dev_outages = _merge_outages(dev_outages)
        devices[dev_id] = dev
        messages.extend(msgs)
        outages.extend(dev_outages)
        if dev["protocol"] == "mqtt":
            actions.extend(_device_actions(dev, msgs, dev_outages, float(rng.uniform(0, 1))))
    topics = sorted({m.topic for m in messages})
    for i in range(sc.misconfigured):
        actions.extend(_misconfigured(np.random.default_rng([sc.seed, 2, i]), sc, i))
    for i in range(sc.dashboards):
        actions.extend(_dashboard(np.random.default_rng([sc.seed, 3, i]), sc, i))
    for i in range(sc.attackers):
        actions.extend(_attacker(np.random.default_rng([sc.seed, 4, i]), sc, i, topics))
    messages.sort(key=lambda m: (m.t, m.device, m.seq))
    actions.sort(key=lambda a: (a.t, a.client))
    outages.sort(key=lambda o: (o.start, o.device))
    return FleetRun(sc, devices, messages, actions, outages)


def _merge_outages(outs: list[Outage]) -> list[Outage]:
    out: list[Outage] = []
    for o in sorted(outs, key=lambda o: o.start):
        if out and o.start <= out[-1].end:
            last = out[-1]
            out[-1] = replace(last, end=max(last.end, o.end))
        else:
            out.append(o)
    return out
