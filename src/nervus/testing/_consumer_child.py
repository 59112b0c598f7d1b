"""A consumer process for the cross-process conformance scenarios.

    python -m nervus.testing._consumer_child URL CHANNEL GROUP [--ack all|N] [--hold-after N]

Joins ``GROUP`` on ``CHANNEL`` of the transport ``URL`` and reports, one JSON
object a line on stdout, what it does:

    {"event": "subscribed"}
    {"event": "assignment", "pairs": [[channel, partition], ...]}   on every change
    {"event": "delivery", "channel": ..., "partition": ..., "offset": ...,
     "n": ..., "attempt": ...}                                       each fetched message
    {"event": "acked", "ns": [...]}                                  after ack() returned
    {"event": "holding"}          after --hold-after deliveries: stops fetching, holds them
    {"event": "closed"}           after SIGTERM or SIGINT closed the subscription

``--ack all`` (the default) acks every batch; ``--ack N`` acks only the first N
deliveries and keeps the rest unsettled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from nervus.testing._scenario import number
from nervus.transports import Delivery, Subscription, from_url


def _report(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nervus.testing._consumer_child")
    parser.add_argument("url")
    parser.add_argument("channel")
    parser.add_argument("group")
    parser.add_argument("--ack", default="all", help="'all' or how many deliveries to ack")
    parser.add_argument("--hold-after", type=int, default=None, metavar="N")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--fetch-timeout", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.ack != "all" and not args.ack.isdigit():
        parser.error(f"--ack {args.ack!r}: give 'all' or a count of deliveries")
    return args


async def _consume(args: argparse.Namespace, stop: asyncio.Event) -> None:
    transport = from_url(args.url)
    await transport.connect()
    try:
        subscription = await transport.subscribe([args.channel], args.group)
        _report("subscribed")
        await _loop(args, subscription, stop)
        await subscription.close()
        _report("closed")
    finally:
        await transport.close()


async def _loop(args: argparse.Namespace, subscription: Subscription, stop: asyncio.Event) -> None:
    ack_limit = None if args.ack == "all" else int(args.ack)
    acked = 0
    received = 0
    assignment: frozenset[tuple[str, int]] | None = None
    while not stop.is_set():
        if args.hold_after is not None and received >= args.hold_after:
            _report("holding")
            await stop.wait()
            return
        want = args.batch
        if args.hold_after is not None:
            want = min(want, args.hold_after - received)
        batch = await subscription.fetch(want, args.fetch_timeout)
        current = subscription.assignment()
        if current != assignment:
            assignment = current
            _report("assignment", pairs=sorted([c, p] for c, p in current))
        for d in batch:
            _report(
                "delivery",
                channel=d.channel,
                partition=d.partition,
                offset=d.offset,
                n=number(d),
                attempt=d.attempt,
            )
        received += len(batch)
        to_ack: list[Delivery] = list(batch)
        if ack_limit is not None:
            to_ack = to_ack[: max(ack_limit - acked, 0)]
        if to_ack:
            await subscription.ack(to_ack)
            acked += len(to_ack)
            _report("acked", ns=[number(d) for d in to_ack])


async def _main(argv: list[str] | None) -> None:
    args = _arguments(argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await _consume(args, stop)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_main(argv))


if __name__ == "__main__":
    main()
