"""The one place the gateway is put together: :class:`~.assembly.Gateway` builds every part
from the validated configuration and hands each what it needs (see docs/architecture.md);
:mod:`.process` runs it until a signal."""

from .assembly import Gateway
from .datadir import DataDirLocked, lock_data_dir
from .process import run_gateway, serve

__all__ = ["DataDirLocked", "Gateway", "lock_data_dir", "run_gateway", "serve"]
