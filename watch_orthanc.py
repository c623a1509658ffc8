#!/usr/bin/env python3
"""Classify every CR/DX image that reaches Orthanc, and store its SR back into the same study.

The three scripts' pipeline, run against the PACS: images are fetched over Orthanc's REST
API, classified by the same engine as process_dicom.py, turned into SRs by the same
builder as generate_sr.py, and stored and verified as upload_dicom.py does. Each image
gets exactly one result per model weights, however often the watcher is stopped,
killed or restarted; see the README's "Watching Orthanc" section.

Exactly once, also with several watchers (each with its own --state-dir, on one host or
many) on one Orthanc, or on several Orthancs sharing one PostgreSQL index: before
classifying an image a watcher claims it in Orthanc (the instance's "cxrsr-claim"
metadata, which needs "CheckRevisions": true and the metadata declared under
"UserMetadata", as in the project's orthanc.json, in every Orthanc of the group). An
image another watcher holds is left to it; the claim of a watcher that died expires (a
lease of 120 s, renewed while it works; at once if it was a process of this host) and is
taken over, its result rebuilt byte-identically. A watcher that cannot reach Orthanc
backs off and gives up a claim it could not renew before it expires. Hosts need
synchronised clocks (NTP). An image's key image is stored and verified before its SR,
and it has a result only when its SR and key image are both in Orthanc. Without claims
in Orthanc, a W: line says so and the watcher works alone.

Health: the running watcher rewrites DIR/heartbeat.json at every turn of its loop;
--check-health --state-dir DIR exits 0 while it is fresh, 1 once it is older than
max(60 s, 3 x --poll-interval).

Stopping: SIGTERM stops at the next safe point, within 10 s, exit 0 (work in flight is
given back and repeated by the next run); Ctrl-C stops at once, exit 130. Nothing
finished is lost either way.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cxrsr import cli
from cxrsr.config import orthanc_settings
from cxrsr.errors import PipelineError
from cxrsr.pacs import orthanc

DEFAULT_STATE_DIR = Path("output/watch")
#: As cxrsr.pacs.watch.DEFAULT_MAX_ATTEMPTS (not imported: --help stays fast).
DEFAULT_MAX_ATTEMPTS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser(
        "watch_orthanc.py",
        __doc__,
        "wrong credentials, the model weights are missing, the state folder cannot be "
        "written, or (with --once) Orthanc is unreachable",
    )
    params = parser.add_argument_group("parameters")
    params.add_argument(
        "--once",
        action="store_true",
        help="backfill: classify every CR/DX image in Orthanc without a complete result "
        "(SR and key image) from these weights, then exit (0, or 1 if any image failed, "
        "one whose results could not all be stored included); without it, run until "
        "SIGTERM or Ctrl-C, following Orthanc's change log",
    )
    params.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="cursor, audit log (audit.jsonl) and dead letters (dead-letters.jsonl) "
        "(default: %(default)s)",
    )
    params.add_argument(
        "--check-health",
        action="store_true",
        help="do nothing but read the heartbeat that the running watcher with this "
        "--state-dir rewrites at every turn of its loop: exit 0 if it is fresh, 1 (one "
        "line saying why) if it is missing or older than max(60 s, 3 x --poll-interval) "
        "of that watcher; for container healthchecks and monitoring",
    )
    params.add_argument(
        "--retry-failed",
        action="store_true",
        help="try the dead letters (images that failed before) again",
    )
    params.add_argument(
        "--max-attempts",
        type=cli.positive_int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help="attempts to store an image's results (Orthanc refused or lost its key image "
        "or SR) before the image becomes a dead letter; each failed attempt counts as a "
        "failure (default: %(default)s)",
    )
    params.add_argument(
        "--poll-interval",
        type=cli.positive_seconds,
        default=1.0,
        metavar="S",
        help="seconds between two reads of Orthanc's change log (default: %(default)s)",
    )
    params.add_argument(
        "--reconcile-interval",
        type=cli.positive_seconds,
        default=60.0,
        metavar="S",
        help="seconds between two sweeps of Orthanc's CR/DX series, which catch what the "
        "change log lost; a sweep is two requests plus a look at each series not found "
        "complete before (default: %(default)s)",
    )
    params.add_argument(
        "--full-reconcile-interval",
        type=cli.positive_seconds,
        default=3600.0,
        metavar="S",
        help="seconds between two full comparisons of every CR/DX series with its results "
        "in Orthanc (also on start), which restore results deleted from Orthanc "
        "(default: %(default)s)",
    )
    cli.add_domain_option(params)
    params.add_argument(
        "--no-key-images",
        action="store_true",
        help="store the SRs only, without a key image each (default: both, as generate_sr.py)",
    )
    cli.add_model_options(parser)
    net = parser.add_argument_group("network options")
    net.add_argument(
        "--url", help="Orthanc's REST URL (default: ORTHANC_URL, else http://127.0.0.1:8042)"
    )
    net.add_argument("--username", help="default: ORTHANC_USERNAME (environment or .env)")
    net.add_argument(
        "--password", help="default: ORTHANC_PASSWORD (prefer the environment or .env)"
    )
    net.add_argument(
        "--timeout", type=cli.positive_seconds, default=30.0, help="seconds per answer"
    )
    net.add_argument(
        "--retries", type=cli.non_negative_int, default=4, help="retries per request (default: 4)"
    )
    return parser


def check_health(state_dir: Path) -> int:
    """``--check-health``: whether the watcher using ``state_dir`` is alive and looping."""
    from cxrsr.pacs.health import check

    fresh, line = check(state_dir)
    if fresh:
        print(line)
        return cli.EXIT_OK
    cli.log.error("%s", line)
    return cli.EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args)
    if args.check_health:
        return check_health(args.state_dir)
    if "," in args.weights:
        raise PipelineError(
            f"--weights {args.weights}: the watcher runs one model; several models run only "
            "in process_dicom.py (its local engine)",
            exit_code=2,
        )
    problem = orthanc.url_problem(args.url) if args.url else None
    if problem:
        parser.error(problem)

    stop = threading.Event()
    stopped_by: list[int] = []

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # Only a flag: the watcher stops at its next safe point (between two batches,
        # two requests, or in a wait), never in the middle of recording something.
        stopped_by.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)

    def connect(probe: bool = False) -> orthanc.OrthancClient:
        return orthanc.OrthancClient(
            orthanc_settings(args.url, args.username, args.password),
            timeout=args.timeout,
            retry=orthanc.RetryPolicy(retries=0 if probe else args.retries),
        )

    from cxrsr.dicomio.domain import DomainPolicy
    from cxrsr.model.classifier import classifier_from_options
    from cxrsr.pacs.health import Heartbeat
    from cxrsr.pacs.watch import Counts, OrthancError, Stopping, Watcher, run_forever
    from cxrsr.pacs.watch_state import WatchState

    try:
        client = connect()
        if args.once:
            client.system()  # unreachable or wrong credentials: one line, exit 3
        classifier = classifier_from_options(args)
        try:
            # The state's records belong to one model: these weights at this precision.
            model_key = classifier.card.weights_sha256
            if classifier.precision != "fp32":
                model_key += f"/{classifier.precision}"
            state = WatchState.open(
                args.state_dir,
                model_key,
                retry_failed=args.retry_failed,
                domain=args.domain,
            )
        except OSError as exc:
            cli.log.error("%s: cannot use the state folder: %s", args.state_dir, exc)
            return cli.EXIT_FATAL
        watcher = Watcher(
            client,
            classifier,
            state,
            batch_size=args.batch_size,
            workers=args.workers,
            read_timeout=args.read_timeout,
            stop=stop,
            domain=DomainPolicy(args.domain),
            key_images=not args.no_key_images,
            max_attempts=args.max_attempts,
            heartbeat=None if args.once else Heartbeat(args.state_dir, args.poll_interval),
        )
        cli.log.info(
            "watching Orthanc at %s with %s (state in %s)",
            client.url,
            args.weights,
            args.state_dir,
        )
        if args.once:
            with cli.progress(args, total=None, unit="img") as bar:
                watcher.on_progress = bar.update
                counts: Counts = watcher.reconcile()
            cli.summary(counts.summary())
            return cli.EXIT_FAILED if counts.failed else cli.EXIT_OK
        run_forever(
            watcher,
            connect,
            args.poll_interval,
            args.reconcile_interval,
            args.full_reconcile_interval,
        )
        return cli.EXIT_OK
    except (orthanc.OrthancUnavailable, OrthancError) as exc:
        if stop.is_set():  # SIGTERM while a request was failing: a stop, not an outage
            cli.log.info("stopped; work in flight is given back and will be repeated")
            return cli.EXIT_OK
        # Only --once ends here: the default mode waits an outage out.
        raise PipelineError(f"Orthanc at {client.url} stopped answering: {exc}", 3) from exc
    except Stopping:
        cli.log.info("stopped; work in flight is given back and will be repeated")
        return cli.EXIT_OK
    except Exception:
        if stopped_by:  # SIGTERM reached the reader processes first: a stop, not a bug
            cli.log.info("stopped; work in flight is given back and will be repeated")
            return cli.EXIT_OK
        raise


if __name__ == "__main__":
    sys.exit(cli.run(main))
