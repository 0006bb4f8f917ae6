"""``moeprobe serve TRACE --port PORT``: Prometheus metrics of a trace on disk, following it while it grows."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

HELP = "serve a trace's metrics to Prometheus on 127.0.0.1 (follows a trace being written)"


def add_metric_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    """The options shared by ``serve`` and ``record --metrics-port`` (``prefix`` is "" or "metrics-")."""
    parser.add_argument(f"--{prefix}top-n", dest="top_n", type=int, default=3, metavar="N",
                        help="expose the N hottest experts per layer as slot=1..N series (default 3; 0: none)")
    parser.add_argument("--metrics-per-expert", dest="per_expert", action="store_true",
                        help="also one series per expert and layer (E x layers series: read docs/prometheus.md first)")
    parser.add_argument(f"--{prefix}ep-size", dest="ep_size", type=int, default=8, metavar="W",
                        help="balancedness over W expert-parallel ranks, experts placed contiguously (default 8)")
    parser.add_argument(f"--{prefix}window-steps", dest="window_steps", type=int, default=128, metavar="S",
                        help="the *_window metrics cover the last S forward steps (default 128)")


def metric_options(args: argparse.Namespace) -> Any:
    from ..metrics.options import MetricsOptions
    from .main import UsageError

    try:
        return MetricsOptions(top_n=args.top_n, per_expert=args.per_expert, ep_size=args.ep_size, window_steps=args.window_steps)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeprobe serve",
        description="Serve http://127.0.0.1:PORT/metrics (Prometheus / OpenMetrics) from TRACE; a trace still "
        "being written is followed, each scrape counting the segments written since the last one.",
    )
    parser.add_argument("trace", help="trace directory")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0: any free port, printed)")
    add_metric_options(parser, "")
    return parser


def main(argv: list[str]) -> int:
    from ..metrics.endpoint import Endpoint, MetricsEndpointError
    from ..metrics.follow import TraceFollower
    from .main import UsageError

    args = _parser().parse_args(argv)
    options = metric_options(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (0-65535)")
    try:
        follower = TraceFollower(args.trace, options)
    except ValueError as exc:  # a manifest whose layers cannot be counted
        print(f"moeprobe serve: {args.trace}: {exc}", file=sys.stderr)
        return 1
    try:
        endpoint = Endpoint(args.port, options)
    except MetricsEndpointError as exc:
        follower.close()
        print(f"moeprobe serve: {exc}", file=sys.stderr)
        return 1
    endpoint.add(follower.views)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"moeprobe: serving metrics of {args.trace} on {endpoint.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        endpoint.close()
        follower.close()
    print("moeprobe serve: stopped", file=sys.stderr)
    return 0
