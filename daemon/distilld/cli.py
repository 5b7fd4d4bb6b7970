"""Command line: parse arguments, call one function, turn DistilldError into a clear message."""

from __future__ import annotations

import argparse
import json
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
    if args.command == "policy":
        return _policy(args, settings)
    if args.command == "run":
        from distilld.app import run_forever
        from distilld.policy.load import load_policies

        policies_dir = args.policies or settings.policies_dir
        run_forever(settings, load_policies(policies_dir), policies_dir)
        return 0
    if args.command == "replay":
        from distilld.traffic.replay import iter_jsonl_lines, replay

        if not args.file.is_file():
            raise DistilldError(f"replay file {args.file} does not exist or is not a file")
        kafka = settings.kafka(args.bootstrap_servers)
        result = replay(kafka, iter_jsonl_lines(args.file), args.topic, args.rate, args.limit)
        print(
            json.dumps(
                {
                    "sent": result.sent,
                    "seconds": round(result.seconds, 3),
                    "rate": round(result.rate, 1),
                    "topic": args.topic,
                }
            )
        )
        return 0
    if args.command == "check":
        return _check(args, settings)
    if args.command == "status":
        return _status(args, settings)
    if args.command == "report":
        return _report(args, settings)
    if args.command in ("retrain", "versions", "promote", "rollback"):
        return _registry_command(args, settings)
    if args.command == "demo":
        from distilld.demo.run import run_demo

        return run_demo(
            settings, rate=args.rate, shift_after=args.shift_after, timeout_s=args.timeout
        )
    raise AssertionError(f"unhandled command {args.command}")


def _check(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every verdict is ok or has too little data, 3 when something is breached."""
    from distilld.app import check_once
    from distilld.policy.load import load_policies

    policies = load_policies(args.policies or settings.policies_dir)
    outcomes = check_once(settings, policies, list(args.tasks) or None)
    breached = False
    for outcome in outcomes:
        for verdict in outcome.verdicts:
            breached |= verdict.status.value == "breach"
            value = "-" if verdict.value is None else f"{verdict.value:.3f}"
            print(
                f"{outcome.task}: {verdict.metric} {verdict.segment}: "
                f"{verdict.status.value} (value {value}, threshold {verdict.threshold})"
            )
        if outcome.drift_note:
            print(f"{outcome.task}: drift: {outcome.drift_note}")
        if outcome.report_dir is not None:
            print(f"{outcome.task}: report {outcome.report_dir}")
    return 3 if breached else 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from distilld.app import existing_store
    from distilld.policy.load import load_policies
    from distilld.registry import ModelRegistry
    from distilld.status import format_status, task_status

    policies = load_policies(args.policies or settings.policies_dir)
    unknown = sorted(set(args.tasks) - set(policies))
    if unknown:
        raise ConfigError(f"no policy for task(s) {unknown}; known tasks: {sorted(policies)}")
    store = existing_store(settings)
    try:
        for task in args.tasks or sorted(policies):
            root = settings.registry_root / task
            registry = ModelRegistry(root) if root.is_dir() else None
            status = task_status(policies[task], store, registry=registry)
            if args.json:
                print(json.dumps(dataclasses.asdict(status), default=str))
            else:
                print(format_status(status))
    finally:
        store.close()
    return 0


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from distilld.app import existing_store
    from distilld.policy.load import load_policies
    from distilld.registry import ModelRegistry
    from distilld.report import write_report

    policies = load_policies(args.policies or settings.policies_dir)
    registries = {
        task: ModelRegistry(settings.registry_root / task)
        if (settings.registry_root / task).is_dir()
        else None
        for task in policies
    }
    store = existing_store(settings)
    try:
        out = write_report(
            policies,
            store,
            registries,
            settings.reports_dir,
            args.out or settings.state_dir / "report.html",
        )
    finally:
        store.close()
    print(f"report written to {out}")
    return 0


def _registry_command(args: argparse.Namespace, settings: Settings) -> int:
    from distilld.registry import ModelRegistry

    if args.command == "retrain":
        from distilld.policy.load import load_policies
        from distilld.retrain.manager import request_retraining

        policies = load_policies(args.policies or settings.policies_dir)
        policy = policies.get(args.task)
        if policy is None:
            raise ConfigError(f"no policy for task {args.task!r}; known tasks: {sorted(policies)}")
        if policy.retraining is None or not policy.retraining.enabled:
            raise ConfigError(
                f"task {args.task!r} does not retrain: its policy has no enabled retraining section"
            )
        path = request_retraining(settings.requests_dir, args.task)
        print(
            f"retraining of {args.task!r} requested ({path}); the running daemon starts it "
            "within seconds: follow its alert log (retrain.started, retrain.promoted ...)"
        )
        return 0
    root = settings.registry_root / args.task
    if not root.is_dir():
        raise ConfigError(
            f"no model registry for task {args.task!r} at {root}: the daemon has not run this "
            f"task with retraining (DISTILLD_STATE_DIR={settings.state_dir}, "
            f"DISTILLD_REGISTRY_DIR={settings.registry_dir})"
        )
    registry = ModelRegistry(root)
    if args.command == "versions":
        live = registry.live_version()
        for manifest in registry.list():
            if args.json:
                print(json.dumps(manifest.to_dict(), default=str))
            else:
                marker = "*" if manifest.version == live else " "
                summary = manifest.metrics.get("gate_summary", "")
                print(f"{marker} {manifest.version:<24} {manifest.state:<12} {summary}")
        return 0
    promoting = args.command == "promote"
    manifest = registry.promote(args.version) if promoting else registry.rollback()
    print(f"{args.task}: {manifest.version} is live; the running daemon switches within seconds")
    return 0


def _policy(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every policy is valid and can start here, 2 otherwise. Besides the
    schema, each policy gets the daemon's preflight in this environment (teacher
    secrets, model directories under DISTILLD_MODELS_DIR, vLLM settings); what only
    the running daemon can check is printed as 'not checked' lines."""
    from distilld.policy.load import load_policies, load_policy, policy_json_schema
    from distilld.preflight import check_policies

    if args.policy_command == "schema":
        print(json.dumps(policy_json_schema(), indent=2))
        return 0
    problems: list[str] = []
    for path in args.paths:
        try:
            if path.is_dir():
                found = load_policies(path)
            else:
                policy = load_policy(path)
                found = {policy.task: policy}
        except PolicyError as exc:
            problems.extend(exc.problems or [str(exc)])
            continue
        for task in sorted(found):
            report = check_policies(settings, {task: found[task]}, models_dir_required=False)
            problems.extend(f"{path}: {problem}" for problem in report.problems)
            if not report.problems:
                print(f"ok: {path}: task {task!r}")
            for line in report.not_checked:
                print(f"  not checked here: {line}")
            for line in found[task].warnings():  # valid, but will not work as written
                print(f"  warning: {path}: task {task!r}: {line}")
    if problems:
        print("distilld: invalid policy:", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 2
    return 0
