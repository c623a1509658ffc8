#!/usr/bin/env python3
"""Upload DICOM images and SRs to Orthanc, then prove through its API that they arrived.

Each file is recognised by content (not by name), its header read with pydicom (a
file whose header is malformed is never sent: it could crash the PACS), hashed, sent
with ``POST /instances`` by a few parallel workers over keep-alive connections, and ends as
``stored``, ``already stored``, ``rejected`` (Orthanc answered 4xx) or ``failed`` (no
answer after the retries, or not sent because malformed); files that are not DICOM are
passed over with a reason. Afterwards every acknowledged instance is checked: present in
Orthanc, with the MD5 of the bytes sent (the MD5 Orthanc recorded, or, from an Orthanc
that keeps none, that of the file read back), and each SR or key image in the same
Orthanc study and patient as its image; the summary line says which way.

Any other PACS: --to dicomweb URL stores with STOW-RS and proves each instance with a
QIDO-RS search; --to dimse HOST:PORT stores with C-STORE and proves with Storage
Commitment (else C-FIND). Both ask the PACS first what it holds and send only the rest,
after the same header check.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys

# pydicom imports numpy, whose OpenBLAS starts a busy-waiting thread per core at import:
# about 0.1 s of CPU (measured) that, on loopback, Orthanc needs more. The uploader never
# multiplies a matrix. Set before any import of numpy; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cxrsr.cli import (
    EXIT_FAILED,
    EXIT_OK,
    log,
    make_parser,
    non_negative_int,
    positive_int,
    positive_seconds,
    progress,
    run,
    setup_logging,
    summary,
)
from cxrsr.config import orthanc_settings
from cxrsr.dicomio.discovery import Source, check_inputs_exist, iter_sources
from cxrsr.errors import PipelineError
from cxrsr.pacs import orthanc, targets, upload, verify
from cxrsr.pacs.targets import Target

#: Inputs when no PATH is given: the images, and generate_sr.py's output if it exists.
DEFAULT_INPUTS = (Path("data"), Path("output") / "sr")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "upload_dicom.py",
        __doc__,
        "wrong credentials, Orthanc (or the DICOMweb server, or the DICOM peer) unreachable, "
        "the URL is not Orthanc (or not DICOMweb), or the DICOM peer rejected our AE titles",
    )
    params = parser.add_argument_group("parameters")
    params.add_argument(
        "paths",
        metavar="PATH",
        nargs="*",
        help="DICOM files, folders (recursive) and .zip archives "
        "(default: data/ and output/sr/ if present)",
    )
    params.add_argument(
        "--dry-run", action="store_true", help="list what would be sent; send nothing"
    )
    net = parser.add_argument_group("network options")
    net.add_argument(
        "--to",
        nargs="+",
        metavar=("TARGET", "ADDRESS"),
        default=["orthanc"],
        help="where to store: 'orthanc' (default: Orthanc's REST API at --url), "
        "'dicomweb URL' (any DICOMweb server: STOW-RS, proved by QIDO-RS; credentials from "
        "DICOMWEB_USERNAME/DICOMWEB_PASSWORD or DICOMWEB_TOKEN), or 'dimse HOST:PORT' (any "
        "DICOM storage SCP: C-STORE, proved by Storage Commitment, else C-FIND)",
    )
    net.add_argument(
        "--url",
        type=orthanc_url,
        help="Orthanc's REST URL (default: ORTHANC_URL, else http://127.0.0.1:8042)",
    )
    net.add_argument("--username", help="default: ORTHANC_USERNAME (environment or .env)")
    net.add_argument(
        "--password",
        help="default: ORTHANC_PASSWORD (environment or .env; prefer those: "
        "a command-line password is visible to other users of this machine)",
    )
    net.add_argument(
        # 16 rather than 8: 1.31x against 1.13x the naive loop on loopback, 5.2x against
        # 4.1x across 5 ms (bench/bench_upload.py): Orthanc stores more in parallel than
        # the two cores suggest, and a worker busy parsing a header is not sending.
        "--workers",
        type=positive_int,
        help="parallel uploads (default: 16; 4 associations for --to dimse)",
    )
    net.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds to wait for a connection and for each answer (default: 30); "
        "a request with all its retries gives up after 5 minutes",
    )
    net.add_argument(
        "--retries",
        type=non_negative_int,
        default=4,
        help="retries after a connection error, timeout or 5xx: the first at once, then "
        "after 0.5, 1, 2 s ... (at most 8 s) plus up to 0.25 s of jitter (default: 4, waiting "
        "at most 4.25 s in all); 4xx answers are never retried",
    )
    dimse_options = parser.add_argument_group(
        "DIMSE and DICOMweb options (--to dimse, --to dicomweb)"
    )
    dimse_options.add_argument(
        "--aet", default="CXRSR", help="our AE title, as the PACS knows us (default: CXRSR)"
    )
    dimse_options.add_argument(
        "--called-aet", default="ANY-SCP", help="the PACS's AE title (default: ANY-SCP)"
    )
    dimse_options.add_argument(
        "--listen-port",
        type=positive_int,
        help="port where we accept the PACS's storage commitment report on an association "
        "of its own (Orthanc opens one to the modality registered for --aet); without it, "
        "only a report on our own association is awaited",
    )
    dimse_options.add_argument(
        "--tls", action="store_true", help="DICOM TLS (PS3.15 B.1) for --to dimse"
    )
    dimse_options.add_argument(
        "--tls-ca", help="CA certificates (PEM) the PACS's certificate is checked against"
    )
    dimse_options.add_argument("--tls-cert", help="our certificate (PEM), if the PACS asks for one")
    dimse_options.add_argument("--tls-key", help="the key of --tls-cert (PEM)")
    dimse_options.add_argument(
        "--ca-bundle",
        help="CA certificates (PEM) for an https:// DICOMweb URL (default: DICOMWEB_CA_BUNDLE, "
        "else the system's)",
    )
    dimse_options.add_argument(
        "--batch",
        type=positive_int,
        default=16,
        help="files per STOW-RS request; files are read, checked and asked about (what "
        "the PACS holds already) 2 x --batch at a time (default: 16)",
    )
    return parser


def orthanc_url(text: str) -> str:
    """argparse ``type`` for ``--url``: a usage error that never echoes a password."""
    problem = orthanc.url_problem(text)
    if problem is not None:
        # argparse's own message for a failed type would repeat the value, password and all.
        raise argparse.ArgumentTypeError(problem)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    target = make_target(parser, args)
    inputs = [Path(p) for p in args.paths] or [p for p in DEFAULT_INPUTS if p.exists()]
    if not inputs:
        parser.error("no PATH given and neither data/ nor output/sr/ exists here")
    missing = check_inputs_exist(inputs)
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    if args.dry_run:
        return dry_run(list(iter_sources(inputs)))
    if target is not None:
        return send_to(target, inputs, args)

    client = orthanc.OrthancClient(
        orthanc_settings(args.url, args.username, args.password),
        timeout=args.timeout,
        retry=orthanc.RetryPolicy(retries=args.retries),
        connections=args.workers,
    )
    warning = client.cleartext_credentials_warning()
    if warning:
        log.warning(warning)
    system = client.system()  # wrong credentials or no server: one line, exit 3
    log.info("Orthanc %s at %s: uploading", system.get("Version"), client.url)
    with progress(args, total=None, unit="file") as bar:

        def done(outcome: upload.Outcome) -> None:
            upload.log_outcome(outcome)
            bar.update(1)

        # Uploads start with the first file found, not after a walk of every folder.
        outcomes = upload.upload(found(inputs, bar), client, workers=args.workers, on_done=done)
    report = verify.verify(outcomes, client, workers=args.workers)
    client.close()
    report.log_problems()
    summary(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def make_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Target | None:
    """The DICOMweb or DIMSE target ``--to`` names (``None`` for Orthanc's REST API);
    a malformed ``--to`` is a usage error."""
    kind, *rest = args.to
    if args.workers is None:  # associations are heavier than HTTP connections
        args.workers = 4 if kind == "dimse" else 16
    # "--to" takes one or two values, and argparse hands it any PATH that follows too.
    taken = 1 if kind in ("dicomweb", "dimse") else 0
    args.paths[:0] = rest[taken:]
    rest = rest[:taken]
    if kind == "orthanc":
        return None
    if kind not in ("dicomweb", "dimse") or len(rest) != 1:
        parser.error("--to takes 'orthanc', 'dicomweb URL' or 'dimse HOST:PORT'")
    if kind == "dicomweb":
        from cxrsr.pacs import stow

        problem = stow.url_problem(rest[0])
        if problem:
            parser.error(problem)
        settings = stow.DicomWebSettings.from_environment(rest[0], args.ca_bundle)
        client = stow.DicomWebClient(settings, args.timeout, connections=args.workers)
        return stow.DicomWebTarget(client, args.workers)
    # pynetdicom costs a second of start-up: imported only for --to dimse.
    from cxrsr.pacs import dimse

    try:
        host, port = dimse.parse_address(rest[0])
    except ValueError as exc:
        parser.error(f"--to dimse: {exc}")
    tls = server = None
    if args.tls:
        try:
            tls = dimse.tls_context(args.tls_ca, args.tls_cert, args.tls_key)
            if args.tls_cert and args.listen_port:
                server = dimse.tls_server_context(args.tls_ca, args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise PipelineError(f"DICOM TLS: {exc}", 3) from None
    peer = dimse.Peer(
        host, port, args.called_aet, args.aet, args.listen_port, args.timeout, tls, server
    )
    return dimse.DimseTarget(peer, args.workers)


def found(inputs: Sequence[Path], bar: Any) -> Iterator[Source]:
    """The files, as discovery finds them; the progress bar learns the total at the end
    (uploads start with the first file found, not after a walk of every folder)."""
    count = 0
    for source in iter_sources(inputs):
        count += 1
        yield source
    bar.total = count
    bar.refresh()


def send_to(target: Target, inputs: Sequence[Path], args: argparse.Namespace) -> int:
    """Send to a DICOMweb or DIMSE target: the same discovery, header check, progress,
    summary and exit codes as the Orthanc REST upload."""
    target.check()  # unreachable, credentials or AE title refused: one line, exit 3
    log.info("%s: uploading", target.description)
    try:
        with progress(args, total=None, unit="file") as bar:

            def done(outcome: upload.Outcome) -> None:
                if outcome.status == upload.STORED and outcome.reason:
                    log.warning("%s: %s", outcome.name, outcome.reason)
                elif outcome.sent:
                    log.debug(
                        "%s: %s as %s", outcome.name, outcome.status, outcome.sop_instance_uid
                    )
                else:
                    upload.log_outcome(outcome)
                bar.update(1)

            outcomes = targets.send(found(inputs, bar), target, args.workers, args.batch, done)
        report = upload.Report(outcomes)
        target.prove(report)
    finally:
        target.close()
    report.log_problems()
    summary(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def dry_run(sources: Sequence[Source]) -> int:
    """Print each file that would be sent (stdout); ``W:`` for each passed over, ``E:`` for
    each that would fail before sending (unreadable, malformed header)."""
    count = size = passed_over = failing = 0
    for source in sources:
        outcome = upload.inspect_source(source)
        if outcome is None:
            count += 1
            size += source.size
            print(source.name)
        elif outcome.status == upload.PASSED_OVER:
            log.warning(
                "%s: %s", source.name, outcome.reason.replace("not sent", "would not be sent")
            )
            passed_over += 1
        else:
            reason = outcome.reason.removeprefix("not sent: ")
            log.error("%s: %s, would fail", source.name, reason)
            failing += 1
    summary(
        f"dry run: {count} files ({size / 1e6:.1f} MB) would be sent, "
        f"{passed_over} passed over"
        + (f", {failing} would fail" if failing else "")
        + "; nothing sent"
    )
    return EXIT_FAILED if failing else EXIT_OK


if __name__ == "__main__":
    sys.exit(run(main))
