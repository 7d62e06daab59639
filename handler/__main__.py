"""Command line: `python -m handler [--config PATH]` serves; `python -m handler token USER`
prints a token signed with the configured secret (or the dev-token secret the server uses).

A start that fails prints one line naming the cause and the fix and exits non-zero: 2 for a
configuration error, 1 for anything else (the traceback is logged at DEBUG).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from handler.auth import DEV_TOKEN_TTL_S, TokenAuthority
from handler.config import DEFAULT_CONFIG_PATH, Config, load_config
from handler.errors import ConfigError, ProtocolError

EXIT_STARTUP = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m handler", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="config.json")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command")
    token = commands.add_parser("token", help="print a signed token for USER")
    token.add_argument("user", help="the user id (the token's sub claim)")
    token.add_argument("--ttl", type=float, default=DEV_TOKEN_TTL_S, help="lifetime, seconds")
    token.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return parser


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logging.getLogger("handler").info(
                "received %s: shutting down", signal.Signals(signum).name
            )
            return


def _serve(config: Config) -> int:
    from handler.app import startup_message
    from handler.server import serve

    started = False

    async def run() -> None:
        nonlocal started

        async def trigger() -> None:
            nonlocal started
            started = True
            await _until_signal()

        await serve(config, shutdown_trigger=trigger)

    try:
        trio.run(run)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        if started:
            raise
        print("interrupted while starting", file=sys.stderr)  # signals are handled once serving
        return EXIT_INTERRUPTED
    except Exception as error:
        if started:
            raise  # a crash while serving keeps its traceback
        logging.getLogger("handler").debug("startup failed", exc_info=True)
        print(startup_message(error), file=sys.stderr)
        return EXIT_STARTUP
    return 0


def _token(config: Config, user: str, ttl: float) -> int:
    if config.auth.jwt_secret is None and not config.auth.dev_tokens:
        print(
            "config: auth.jwt_secret: required to sign tokens (or turn auth.dev_tokens on)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        # With dev tokens and no secret, this reads (or creates) the server's secret file.
        print(TokenAuthority(config.auth).issue(user, ttl))
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    except ProtocolError as error:
        print(f"user: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "token":
        return _token(config, args.user, args.ttl)
    return _serve(config)


if __name__ == "__main__":
    sys.exit(main())
