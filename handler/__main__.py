"""Command line: `python -m handler [--config PATH]` serves; `python -m handler token USER`
prints a token signed with the configured secret."""

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

EXIT_CONFIG = 2


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
    from handler.server import serve

    trio.run(lambda: serve(config, shutdown_trigger=_until_signal))
    return 0


def _token(config: Config, user: str, ttl: float) -> int:
    if config.auth.jwt_secret is None:
        print("config: auth.jwt_secret: required to sign tokens", file=sys.stderr)
        return EXIT_CONFIG
    try:
        print(TokenAuthority(config.auth).issue(user, ttl))
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
