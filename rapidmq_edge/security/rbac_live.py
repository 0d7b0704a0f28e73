"""The running gateway's RBAC rules: the stored model plus ``[[acl]]``, reloaded live.

:meth:`LiveRbac.policy` is called on every decision; at most every ``interval`` seconds it
reads the database's ``generation`` (one indexed row) and, when it changed, builds a new
:class:`~.rbac.RbacPolicy` (its decision cache starts empty). A database that cannot be read
or holds rules that do not validate keeps the running rules (logged once, with a count).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError
from ..telemetry import RepeatedLog
from .rbac import RbacError, RbacModel, RbacPolicy, Role
from .rbac_store import RbacStore

__all__ = ["LiveRbac"]

log = logging.getLogger(__name__)


class LiveRbac:
    """The current :class:`RbacPolicy` of one database."""

    def __init__(self, path: Path, config_role: Role | None, interval: float = 0.5,
                 tenant_of: Callable[[str | None], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cert_cn_of: Callable[[str], str | None] | None = None) -> None:
        self.path = path
        self.config_role = config_role
        self.interval = interval
        self.tenant_of = tenant_of
        self.cert_cn_of = cert_cn_of
        self.clock = clock
        try:
            self._store = RbacStore(path)
            gen, model = self._store.load()
        except (sqlite3.Error, RbacError) as exc:
            raise ConfigError(f"auth.rbac_db: {path}: {exc} (fix it with rapidmq-edge role / "
                              "group / user, or restore a backup)", "auth.rbac_db") from None
        self._repeats = RepeatedLog(log)
        self._policy = RbacPolicy(model, config_role, gen, tenant_of, cert_cn_of)
        self._checked = clock()

    @property
    def generation(self) -> int:
        """The generation of the rules in force (changes with every stored edit)."""
        return self._policy.generation

    def policy(self) -> RbacPolicy:
        """The rules in force, reloaded first if the database changed (checked lazily)."""
        now = self.clock()
        if now - self._checked >= self.interval:
            self._checked = now
            self.reload()
        return self._policy

    def reload(self) -> bool:
        """Reload when the stored generation moved; True when the rules were replaced."""
        try:
            if self._store.generation() == self._policy.generation:
                return False
            gen, model = self._store.load()
        except (sqlite3.Error, RbacError, ValueError) as exc:
            self._repeats("reload", logging.WARNING,
                          "RBAC rules in %s not reloaded, generation %d stays: %s",
                          self.path, self._policy.generation, exc)
            return False
        self.replace(gen, model)
        return True

    def replace(self, generation: int, model: RbacModel) -> None:
        """Put ``model`` in force (a fresh decision cache)."""
        self._policy = RbacPolicy(model, self.config_role, generation, self.tenant_of,
                                  self.cert_cn_of)
        log.info("RBAC rules generation %d in force: %d roles, %d rules", generation,
                 len(model.roles), self._policy.rule_count)

    def close(self) -> None:
        """Close the database connection."""
        self._store.close()
