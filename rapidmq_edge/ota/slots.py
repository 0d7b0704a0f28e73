"""A/B model slots on disk, the active choice per component, and the crash-loop guard.

Layout under ``<data_dir>/ota/slots/<component>/``::

    a/ b/          model.onnx, manifest.cose (the signed envelope), info.json (ModelInfo)
    active.json    which slot is active, which was before, the state (ComponentState)
    .incoming/     a slot being written (never referenced by active.json)
    .lock          flock for read-modify-write (the gateway and ``model rollback``)

Crash safety: a slot is written into ``.incoming`` and fsynced, ``active.json`` stops
referencing the slot about to be replaced, then ``.incoming`` is renamed into place and the
directory fsynced, and only then does ``active.json`` name it as the candidate. Every
``active.json`` change is one fsynced temp file renamed over it (and the directory
fsynced). So a kill -9 anywhere leaves ``active.json`` naming complete slots only: the old
choice or the new one. Installing never touches the active slot.

No active slot means the shipped model in ``models/``. The accepted manifest sequence is
kept in ``ota/sequences.py``, the anti-rollback authority; the sequence here is a label.

Crash-loop guard: :meth:`SlotStore.record_start` at every gateway start counts the starts
since a promotion that never reached :meth:`SlotStore.mark_healthy`; when ``max_starts``
earlier starts within ``window_s`` stayed unhealthy, the component rolls back to the
previous slot (or the shipped model) with the reason recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["SLOTS", "STATES", "ComponentState", "ModelInfo", "SlotError", "SlotStore"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
#: component states: nothing installed, a candidate written, in shadow, promoted, the last
#: candidate rejected, the promoted model rolled back
STATES = ("shipped", "installing", "installed", "shadow", "active", "rejected", "rolled-back")
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.cose"
INFO_FILE = "info.json"
ACTIVE_FILE = "active.json"
#: crash-loop defaults: unhealthy starts within the window before a rollback
MAX_STARTS = 3
WINDOW_S = 300.0


class SlotError(Exception):
    """A slot operation is not possible (the message says why)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a slot holds: from the verified manifest (``digest`` = SHA-256 hex of the
    model file, ``vectors`` re-checked at every start)."""

    sequence: int
    version: str
    digest: str
    size: int
    vectors: list[Any] = field(default_factory=list)
    inputs: list[Any] | None = None
    outputs: list[Any] | None = None
    gate: dict[str, Any] | None = None
    installed: float = 0.0

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelInfo:
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)


@dataclass(frozen=True)
class ComponentState:
    """``active.json``: the active and previous slot (None = the shipped model), the
    candidate slot (installed, in shadow, or just rejected), the state and its reason."""

    component: str
    active: str | None = None
    previous: str | None = None
    candidate: str | None = None
    state: str = "shipped"
    reason: str = ""
    changed: float = 0.0
    promoted: float = 0.0
    healthy: bool = True
    starts: tuple[float, ...] = ()

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ComponentState:
        def slot(key: str) -> str | None:
            v = doc.get(key)
            if v is not None and v not in SLOTS:
                raise SlotError(f"{ACTIVE_FILE}: {key} {v!r} is not a slot")
            return v

        state = doc.get("state", "shipped")
        if state not in STATES:
            raise SlotError(f"{ACTIVE_FILE}: unknown state {state!r}")
        return cls(str(doc["component"]), slot("active"), slot("previous"), slot("candidate"),
                   state, str(doc.get("reason", "")), float(doc.get("changed", 0.0)),
                   float(doc.get("promoted", 0.0)), bool(doc.get("healthy", True)),
                   tuple(float(t) for t in doc.get("starts", ())))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["starts"] = list(self.starts)
        return d


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _pause(step: str) -> None:
    """Test hook: with ``RMQE_OTA_CRASH_AT=<step>`` the process exits hard at ``step`` (a
    kill -9 stand-in at an exact point; the tests run it in a subprocess)."""
    if os.environ.get("RMQE_OTA_CRASH_AT") == step:
        os._exit(137)


class SlotStore:
    """The slots of every component under ``<data_dir>/ota/slots``."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = data_dir / "ota" / "slots"
        self.clock = clock

    # -- reading -------------------------------------------------------------------

    def components(self) -> list[str]:
        """Components that have a slot directory."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / ACTIVE_FILE).exists())

    def state(self, component: str) -> ComponentState:
        """The component's ``active.json`` (the shipped model when there is none)."""
        path = self._dir(component) / ACTIVE_FILE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return ComponentState(component)
        except (OSError, ValueError) as exc:
            raise SlotError(f"{path} unreadable: {exc}") from None
        if not isinstance(doc, dict):
            raise SlotError(f"{path} is not a JSON object")
        try:
            return ComponentState.from_json(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise SlotError(f"{path}: {exc}") from None

    def active(self, component: str) -> Path | None:
        """The active slot's model file, or None: use the shipped model."""
        st = self.state(component)
        return self.model_path(component, st.active) if st.active else None

    def model_path(self, component: str, slot: str) -> Path:
        return self._dir(component) / slot / MODEL_FILE

    def info(self, component: str, slot: str) -> ModelInfo:
        """What ``slot`` holds (SlotError when it holds nothing readable)."""
        path = self._dir(component) / slot / INFO_FILE
        try:
            return ModelInfo.from_json(json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError) as exc:
            raise SlotError(f"slot {component}/{slot} unreadable: {exc}") from None

    def manifest(self, component: str, slot: str) -> bytes:
        """The signed manifest bytes the slot was installed from."""
        return (self._dir(component) / slot / MANIFEST_FILE).read_bytes()

    # -- changing ------------------------------------------------------------------

    def install(self, component: str, model_path: Path, info: ModelInfo,
                manifest: bytes = b"") -> str:
        """Copy ``model_path`` into the inactive slot (fsynced; its SHA-256 and size must be
        ``info``'s) and make it the candidate (state "installed"). Returns the slot."""
        base = self._dir(component)
        base.mkdir(parents=True, exist_ok=True)
        incoming = base / ".incoming"
        with self._locked(component):
            st = self.state(component)
            slot = "b" if st.active == "a" else "a"
            if incoming.exists():
                shutil.rmtree(incoming)
            incoming.mkdir()
            h = hashlib.sha256()
            size = 0
            with open(model_path, "rb") as src, open(incoming / MODEL_FILE, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if h.hexdigest() != info.digest.lower() or size != info.size:
                shutil.rmtree(incoming)
                raise SlotError(f"{model_path.name} is not the model the manifest names "
                                f"(sha256 {h.hexdigest()[:16]}..., {size} bytes)")
            _pause("install-copied")
            _write_file(incoming / MANIFEST_FILE, manifest)
            info = replace(info, installed=self.clock())
            _write_file(incoming / INFO_FILE, json.dumps(asdict(info)).encode())
            _fsync_dir(incoming)
            # active.json stops naming the slot that is about to be replaced
            self._write(replace(st, candidate=None, state="installing", reason="",
                                previous=None if st.previous == slot else st.previous,
                                changed=self.clock()))
            _pause("install-released")
            old = base / slot
            if old.exists():
                trash = base / f".old-{slot}"
                if trash.exists():
                    shutil.rmtree(trash)
                old.rename(trash)
                _pause("install-moved-old")
                shutil.rmtree(trash)
            incoming.rename(old)
            _fsync_dir(base)
            _pause("install-renamed")
            self._write(replace(self.state(component), candidate=slot, state="installed",
                                reason="", changed=self.clock()))
        log.info("ota: %s %s (sequence %d) installed in slot %s", component, info.version,
                 info.sequence, slot)
        return slot

    def set_state(self, component: str, state: str, reason: str = "") -> ComponentState:
        """Record the candidate's state ("shadow", "rejected" with its reason)."""
        if state not in ("shadow", "rejected"):
            raise SlotError(f"set_state: {state!r} is not a candidate state")
        with self._locked(component):
            st = self.state(component)
            if st.candidate is None:
                raise SlotError(f"{component}: no candidate installed")
            new = replace(st, state=state, reason=reason, changed=self.clock())
            self._write(new)
        return new

    def promote(self, component: str) -> str:
        """The candidate becomes the active slot, the active one the previous. Returns it."""
        with self._locked(component):
            st = self.state(component)
            if st.candidate is None or st.state not in ("installed", "shadow"):
                raise SlotError(f"{component}: nothing to promote (state {st.state})")
            now = self.clock()
            _pause("promote-before")
            self._write(replace(st, active=st.candidate, previous=st.active, candidate=None,
                                state="active", reason="", changed=now, promoted=now,
                                healthy=False, starts=()))
            _pause("promote-after")
        log.info("ota: %s slot %s promoted (previous: %s)", component, st.candidate,
                 st.active or "shipped")
        return st.candidate

    def rollback(self, component: str, reason: str) -> str | None:
        """Back to the previous slot (None: the shipped model); the rolled-back slot stays
        on disk, no longer referenced. Returns the slot now active."""
        with self._locked(component):
            st = self.state(component)
            if st.active is None:
                raise SlotError(f"{component}: the shipped model is active, nothing to roll "
                                "back")
            back = st.previous
            self._write(replace(st, active=back, previous=None, candidate=None,
                                state="rolled-back", reason=reason, changed=self.clock(),
                                healthy=True, starts=()))
        log.warning("ota: %s rolled back from slot %s to %s: %s", component, st.active,
                    back or "the shipped model", reason)
        return back

    # -- the crash-loop guard ------------------------------------------------------

    def record_start(self, max_starts: int = MAX_STARTS,
                     window_s: float = WINDOW_S) -> dict[str, str]:
        """Count this start for every promoted component not yet healthy; roll back those
        with ``max_starts`` earlier unhealthy starts within ``window_s``. Returns
        component -> reason of each rollback."""
        out: dict[str, str] = {}
        now = self.clock()
        for component in self.components():
            with self._locked(component):
                st = self.state(component)
                if st.active is None or st.healthy:
                    continue
                recent = tuple(t for t in st.starts if now - t <= window_s)
                if len(recent) < max_starts:
                    self._write(replace(st, starts=(*recent, now)))
                    continue
            reason = (f"crash loop: {len(recent)} starts within {window_s:g} s without a "
                      "healthy period")
            self.rollback(component, reason)
            out[component] = reason
        return out

    def mark_healthy(self) -> list[str]:
        """The gateway ran a healthy period: promoted components are committed."""
        done = []
        for component in self.components():
            with self._locked(component):
                st = self.state(component)
                if st.active is not None and not st.healthy:
                    self._write(replace(st, healthy=True, starts=()))
                    done.append(component)
        return done

    # -- plumbing ------------------------------------------------------------------

    def _dir(self, component: str) -> Path:
        if not component or "/" in component or component.startswith("."):
            raise SlotError(f"bad component name {component!r}")
        return self.root / component

    @contextlib.contextmanager
    def _locked(self, component: str) -> Iterator[None]:
        base = self._dir(component)
        base.mkdir(parents=True, exist_ok=True)
        with open(base / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, st: ComponentState) -> None:
        """``active.json`` replaced atomically: temp file, fsync, rename, fsync the dir."""
        base = self._dir(st.component)
        tmp = base / f".{ACTIVE_FILE}.tmp"
        _write_file(tmp, json.dumps(st.to_json(), indent=1).encode())
        os.replace(tmp, base / ACTIVE_FILE)
        _fsync_dir(base)
