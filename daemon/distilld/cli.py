"""Command line: parse arguments, call one function (a command of distilld/commands, or
distilld.lifecycle.run_forever), turn DistilldError into a clear message."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from distilld import __version__
from distilld.errors import ConfigError, DistilldError, PolicyError
from distilld.log import configure_logging
from distilld.settings import Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distilld",
        description="Declarative distillation daemon: a small student answers production "
        "traffic from Kafka; policies in YAML say how it is kept good.",
        epilog="Settings come from DISTILLD_* environment variables (see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"distilld {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve the tasks of a policies directory until SIGTERM")
    run.add_argument("--policies", type=Path, help="policies directory (DISTILLD_POLICIES_DIR)")

    replay = commands.add_parser("replay", help="produce recorded requests (JSONL) into Kafka")
    replay.add_argument("file", type=Path, help="one request per line, sent as-is")
    replay.add_argument("--topic", required=True, help="requests topic")
    replay.add_argument(
        "--rate", type=float, default=0.0, help="records/s (0: as fast as possible)"
    )
    replay.add_argument("--limit", type=int, default=None, help="send at most this many lines")
    replay.add_argument("--bootstrap-servers", help="host:port (DISTILLD_KAFKA_BOOTSTRAP_SERVERS)")

    policy = commands.add_parser("policy", help="validate policies or print their JSON Schema")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = policy_commands.add_parser("validate", help="check policy files or directories")
    validate.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    policy_commands.add_parser("schema", help="print the policy JSON Schema (editor completion)")

    check = commands.add_parser(
        "check",
        help="run the monitoring checks now (accuracy, drift) on the daemon's records",
    )
    check.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to check (default: all)")
    check.add_argument("--policies", type=Path, help="policies directory (DISTILLD_POLICIES_DIR)")

    status = commands.add_parser(
        "status",
        help="per task: live version, traffic, comparisons, agreement, drift, last alerts",
    )
    status.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to show (default: all)")
    status.add_argument("--policies", type=Path, help="policies directory (DISTILLD_POLICIES_DIR)")
    status.add_argument("--json", action="store_true", help="one JSON object per task")

    report = commands.add_parser(
        "report",
        help="write an HTML page of the daemon's records: agreement and drift over time, "
        "segments, versions, gates, links to the Evidently reports",
    )
    report.add_argument("--policies", type=Path, help="policies directory (DISTILLD_POLICIES_DIR)")
    report.add_argument(
        "--out", type=Path, help="output file (default: $DISTILLD_STATE_DIR/report.html)"
    )

    retrain = commands.add_parser(
        "retrain",
        help="ask the running daemon to retrain a task now (it picks the request up within "
        "seconds; follow the alert log)",
    )
    retrain.add_argument("task", metavar="TASK")
    retrain.add_argument("--policies", type=Path, help="policies directory (DISTILLD_POLICIES_DIR)")

    versions = commands.add_parser("versions", help="a task's model versions in the registry")
    versions.add_argument("task", metavar="TASK")
    versions.add_argument("--json", action="store_true", help="one JSON manifest per line")

    promote = commands.add_parser(
        "promote",
        help="make a registered version live (the running daemon switches to it within "
        "seconds, without losing requests)",
    )
    promote.add_argument("task", metavar="TASK")
    promote.add_argument("version", metavar="VERSION")

    rollback = commands.add_parser(
        "rollback", help="make the previous live version live again (the daemon follows)"
    )
    rollback.add_argument("task", metavar="TASK")

    demo = commands.add_parser(
        "demo",
        help="quick start: the closed loop on Rotten Tomatoes reviews (shift, detection, "
        "retraining, promotion, recovery), then a summary",
    )
    demo.add_argument("--rate", type=float, default=8.0, help="requests/s replayed (default 8)")
    demo.add_argument(
        "--shift-after",
        type=int,
        default=300,
        help="requests of the first population before the shift (default 300)",
    )
    demo.add_argument(
        "--timeout", type=float, default=1200.0, help="give up after this many s (default 1200)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        return _dispatch(args, settings)
    except PolicyError as exc:
        print(f"distilld: invalid policy: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"distilld: configuration error: {exc}", file=sys.stderr)
        return 2
    except DistilldError as exc:
        print(f"distilld: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    # Each command imports only what it needs (see distilld/commands/__init__.py).
    policies_dir: Path = getattr(args, "policies", None) or settings.policies_dir
    if args.command == "policy":
        from distilld.commands import policy

        if args.policy_command == "schema":
            return policy.schema()
        return policy.validate(settings, list(args.paths))
    if args.command == "run":
        from distilld.lifecycle import run_forever
        from distilld.policy.load import load_policies

        run_forever(settings, load_policies(policies_dir), policies_dir)
        return 0
    if args.command == "replay":
        from distilld.commands.replay import replay_file

        return replay_file(
            settings, args.file, args.topic, args.rate, args.limit, args.bootstrap_servers
        )
    if args.command == "check":
        from distilld.commands.check import check

        return check(settings, policies_dir, list(args.tasks))
    if args.command == "status":
        from distilld.commands.status import status

        return status(settings, policies_dir, list(args.tasks), args.json)
    if args.command == "report":
        from distilld.commands.report import report

        return report(settings, policies_dir, args.out)
    if args.command == "retrain":
        from distilld.commands.retrain import retrain

        return retrain(settings, policies_dir, args.task)
    if args.command in ("versions", "promote", "rollback"):
        from distilld.commands import registry

        if args.command == "versions":
            return registry.versions(settings, args.task, args.json)
        if args.command == "promote":
            return registry.promote(settings, args.task, args.version)
        return registry.rollback(settings, args.task)
    if args.command == "demo":
        from distilld.demo.run import run_demo

        return run_demo(
            settings, rate=args.rate, shift_after=args.shift_after, timeout_s=args.timeout
        )
    raise AssertionError(f"unhandled command {args.command}")
