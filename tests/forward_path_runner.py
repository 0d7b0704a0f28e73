"""Run the gateway with the broker's planned forward (``ClientConnection._forward_planned``)
on or off, counting the PUBLISHes that took it::

    python tests/forward_path_runner.py on|off COUNT_FILE run --config gateway.toml

COUNT_FILE holds the count once the gateway has stopped (SIGTERM). The only change to the
gateway is that switch and the count, so a test can run one scenario both ways."""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rapidmq_edge.broker.connection import ClientConnection  # noqa: E402
from rapidmq_edge.cli import main  # noqa: E402
from rapidmq_edge.mqtt.packets import Publish  # noqa: E402

mode, count_file, *argv = sys.argv[1:]
ClientConnection.forward_planned = mode == "on"
taken = [0]
planned = ClientConnection._forward_planned


def _counting(self: ClientConnection, p: Publish) -> bool:
    done = planned(self, p)
    taken[0] += done
    return done


ClientConnection._forward_planned = _counting  # type: ignore[method-assign]
atexit.register(lambda: Path(count_file).write_text(str(taken[0])))
raise SystemExit(main(argv))
