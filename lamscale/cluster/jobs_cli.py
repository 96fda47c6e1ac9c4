"""`lamscale submit|status|logs|stop|runs`: cluster jobs through Ray's Job Submission API, and run listings."""
from __future__ import annotations

import argparse
import json
import sys

from lamscale.cluster import jobs

ADDRESS_HELP = f"Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {jobs.DEFAULT_ADDRESS})"


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _cmd_submit(args: argparse.Namespace) -> int:
    sub = jobs.build_submission(args.config, args.overrides, args.python)  # bad input fails before any network
    cluster = jobs.ClusterJobs(args.address)
    job_id = cluster.submit(sub)
    address = cluster.address
    # human lines on stderr, the id alone on stdout: JOB=$(lamscale submit …) works
    print(f"[lamscale] submitted run {sub.run_url} to {address}", file=sys.stderr, flush=True)
    print(f"[lamscale] follow it: lamscale logs {job_id} --follow --address {address}", file=sys.stderr, flush=True)
    print(job_id, flush=True)
    if not args.follow:
        return 0
    final = cluster.follow(job_id, _write)
    print(f"[lamscale] job {job_id}: {final}", file=sys.stderr, flush=True)
    return 0 if final == "SUCCEEDED" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    state, message = jobs.ClusterJobs(args.address).status(args.job)
    print(state, flush=True)
    if state == "FAILED" and message:
        print(message.strip().splitlines()[-1], file=sys.stderr, flush=True)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    cluster = jobs.ClusterJobs(args.address)
    if args.follow:
        final = cluster.follow(args.job, _write)
        print(f"[lamscale] job {args.job}: {final}", file=sys.stderr, flush=True)
    else:
        _write(cluster.logs(args.job))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    cluster = jobs.ClusterJobs(args.address)
    print(f"[lamscale] stopping {args.job}: the run saves a checkpoint at its next step boundary, then exits",
          file=sys.stderr, flush=True)
    print(cluster.stop(args.job, args.timeout), flush=True)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from lamscale.cluster.runs import format_runs, list_runs

    runs = list_runs(args.storage)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2))
    elif runs:
        print(format_runs(runs))
    else:
        print(f"no runs in {args.storage}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the job and run-listing sub-commands to `lamscale`'s parser."""
    s = sub.add_parser("submit", help="submit `lamscale train CONFIG` to a Ray cluster as a job; prints the job id")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    s.add_argument("--address", default="", help=ADDRESS_HELP)
    s.add_argument("--python", default="python", help="the cluster's Python that has lamscale's dependencies")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    s.set_defaults(func=_cmd_submit)

    for name, help_text, func in (("status", "print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)", _cmd_status),
                                  ("logs", "print a job's logs", _cmd_logs),
                                  ("stop", "stop a job (it saves a checkpoint first) and print its final status", _cmd_stop)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job", help="job id printed by `lamscale submit`")
        p.add_argument("--address", default="", help=ADDRESS_HELP)
        p.set_defaults(func=func)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=jobs.STOP_GRACE_S + 30,
                           help="seconds to wait for the job to end")

    r = sub.add_parser("runs", help="list the runs in a storage folder or s3:// prefix")
    r.add_argument("storage", nargs="?", default="runs/", help="run storage (default runs/)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=_cmd_runs)
