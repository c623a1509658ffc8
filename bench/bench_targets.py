#!/usr/bin/env python3
"""How fast do files reach a PACS by each of upload_dicom.py's targets, against references.

The same file set as ``bench_upload.py`` (copies of the corpus's radiographs, transfer
syntax kept, one large for two small), each run into a fresh local Orthanc with its
DICOMweb plugin and DICOM port, timed as a whole process from start to exit:

* ``--to orthanc``: the REST uploader with its MD5 verification (the baseline);
* ``--to dimse``: C-STORE on parallel associations, proved by Storage Commitment (the
  report comes back to ``--listen-port``), against dcmtk's ``storescu`` proposing each
  file's own transfer syntax (no proof at all);
* ``--to dicomweb``: STOW-RS in batches, proved by QIDO-RS, against a naive loop of one
  ``requests.post`` STOW-RS request per file.

Settings: ``loopback``, and ``5 ms`` each way through ``delay_proxy.py``. Orthanc and
storescu run with ``TCP_NODELAY=1`` (see ``bench_upload.py``). Each run is checked:
Orthanc must hold every instance afterwards.

``--baseline CHECKOUT`` adds ``--to dimse`` and ``--to dicomweb`` as another checkout
of the project runs them (say the last release, in a ``git worktree``), interleaved with
this one's runs, so that a change is measured under the same load as what it changes.

Run from the project root::

    .venv/bin/python bench/bench_targets.py --files 150 --repeats 2
    .venv/bin/python bench/bench_targets.py --files 150 --repeats 2 --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_upload import (  # noqa: E402
    PASSWORD,
    PROJECT_ROOT,
    USERNAME,
    BenchSet,
    Result,
    make_bench_set,
    run_storescu,
)
from delay_proxy import DelayProxy  # noqa: E402

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402

#: One STOW-RS request per file, one at a time, a new connection each time.
NAIVE_STOW = """
import os, sys
from pathlib import Path
import requests
url = os.environ["DICOMWEB_URL"] + "/studies"
auth = (os.environ["DICOMWEB_USERNAME"], os.environ["DICOMWEB_PASSWORD"])
headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary',
           "Accept": "application/dicom+json"}
for path in sorted(Path(sys.argv[1]).iterdir()):
    body = b"--b0undary\\r\\nContent-Type: application/dicom\\r\\n\\r\\n" + path.read_bytes()
    body += b"\\r\\n--b0undary--\\r\\n"
    requests.post(url, data=body, headers=headers, auth=auth).raise_for_status()
"""

AET = "CXRSR"
SCRIPT = str(PROJECT_ROOT / "upload_dicom.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Command = Callable[[BenchSet, str, int, int], list[str]]


def to_orthanc(bench: BenchSet, url: str, dicom_port: int, listen: int) -> list[str]:
    return [sys.executable, SCRIPT, "-q", str(bench.folder)]


def to_dimse(
    bench: BenchSet, url: str, dicom_port: int, listen: int, script: str = SCRIPT
) -> list[str]:
    address = f"127.0.0.1:{dicom_port}"
    return [sys.executable, script, "-q", "--to", "dimse", address, "--aet", AET,
            "--called-aet", "ORTHANC", "--listen-port", str(listen), str(bench.folder)]  # fmt: skip


def to_dicomweb(
    bench: BenchSet, url: str, dicom_port: int, listen: int, script: str = SCRIPT
) -> list[str]:
    return [sys.executable, script, "-q", "--to", "dicomweb", f"{url}/dicom-web", str(bench.folder)]


def naive_stow(bench: BenchSet, url: str, dicom_port: int, listen: int) -> list[str]:
    return [sys.executable, "-c", NAIVE_STOW, str(bench.folder)]


def storescu(bench: BenchSet, url: str, dicom_port: int, listen: int) -> list[str]:
    return run_storescu(bench, url, dicom_port)


METHODS: dict[str, Command] = {
    "--to orthanc": to_orthanc,
    "--to dimse": to_dimse,
    "storescu": storescu,
    "--to dicomweb": to_dicomweb,
    "naive STOW loop": naive_stow,
}


def time_one(bench: BenchSet, method: str, delay: float, workdir: Path) -> tuple[float, str]:
    """A fresh Orthanc, the set sent once by ``method``: (seconds, failure or "")."""
    listen = free_port()
    server = LocalOrthanc(
        workdir,
        USERNAME,
        PASSWORD,
        dicom_server=True,
        dicomweb=True,
        overrides={
            "DicomModalities": {
                "local": {"AET": "STORESCU", "Host": "127.0.0.1", "Port": 104},
                "cxrsr": {"AET": AET, "Host": "127.0.0.1", "Port": listen},
            }
        },
    )
    server.start()
    proxies: list[DelayProxy] = []
    try:
        url, dicom_port = server.url, server.dicom_port
        if delay > 0:
            proxies = [
                DelayProxy("127.0.0.1", server.http_port, delay).start(),
                DelayProxy("127.0.0.1", server.dicom_port, delay).start(),
            ]
            url, dicom_port = proxies[0].url, proxies[1].port
        env = dict(
            os.environ,
            ORTHANC_URL=url,
            ORTHANC_USERNAME=USERNAME,
            ORTHANC_PASSWORD=PASSWORD,
            DICOMWEB_URL=f"{url}/dicom-web",
            DICOMWEB_USERNAME=USERNAME,
            DICOMWEB_PASSWORD=PASSWORD,
            TCP_NODELAY="1",
        )
        command = METHODS[method](bench, url, dicom_port, listen)
        started = time.perf_counter()
        process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - started
        stored = requests.get(
            f"{server.url}/statistics", auth=(USERNAME, PASSWORD), timeout=10
        ).json()["CountInstances"]
        failure = ""
        if process.returncode != 0 or stored != bench.count:
            output = (process.stdout + process.stderr).strip()[-300:]
            failure = f"exit {process.returncode}, {stored}/{bench.count} stored: {output}"
        return seconds, failure
    finally:
        for proxy in proxies:
            proxy.stop()
        server.stop()


#: Each method's reference, for the ratio column.
REFERENCE = {
    "--to dimse": "storescu",
    "--to dicomweb": "naive STOW loop",
    "--to dimse @baseline": "storescu",
    "--to dicomweb @baseline": "naive STOW loop",
}


def add_baseline(checkout: Path) -> None:
    """``--to dimse @baseline`` and ``--to dicomweb @baseline``: ``checkout``'s uploader."""
    script = str(checkout.resolve() / "upload_dicom.py")
    if not Path(script).is_file():
        raise SystemExit(f"--baseline: no upload_dicom.py in {checkout}")
    METHODS["--to dimse @baseline"] = lambda b, u, d, n: to_dimse(b, u, d, n, script)
    METHODS["--to dicomweb @baseline"] = lambda b, u, d, n: to_dicomweb(b, u, d, n, script)


def print_table(results: dict[str, Result], bench: BenchSet) -> None:
    print()
    print(
        f"{'setting':<16}  {'method':<24} {'inst/s':>7} {'vs reference':>22} {'vs --to orthanc':>16}"
    )
    medians = {key: statistics.median(r.seconds) for key, r in results.items()}
    for key, row in results.items():
        setting, method = key.split("|")
        median = medians[key]
        ref = REFERENCE.get(method)
        ref_text = ""
        if ref and f"{setting}|{ref}" in medians:
            ref_text = f"{medians[f'{setting}|{ref}'] / median:.2f}x {ref}"
        base = medians.get(f"{setting}|--to orthanc")
        base_text = f"{base / median:.2f}x" if base else ""
        flag = "  FAILED" if row.failures else ""
        print(
            f"{setting:<16}  {method:<24} {bench.count / median:7.0f} {ref_text:>22} "
            f"{base_text:>16}{flag}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=150, help="instances (default: 150)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method (default: 2)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay (default: 5)")
    parser.add_argument("--settings", default="loopback,network", help="loopback, network")
    parser.add_argument("--methods", help="subset of the methods (default: all)")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout whose uploader runs as '... @baseline'"
    )
    args = parser.parse_args()
    if args.baseline is not None:
        add_baseline(args.baseline)
    os.environ["TCP_NODELAY"] = "1"
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",")]
    settings = {"loopback": 0.0, "network": args.delay_ms / 1000}
    chosen = [s.strip() for s in args.settings.split(",")]
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="cxrsr-bench-") as tmp:
        bench = make_bench_set(Path(tmp) / "files", args.files)
        print(f"{bench.count} files, {bench.size / 1e6:.1f} MB; {os.cpu_count()} CPUs", flush=True)
        runs = 0
        for setting in chosen:
            label = "loopback" if setting == "loopback" else f"{args.delay_ms:g} ms each way"
            for repeat in range(args.repeats):
                order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
                for method in order:
                    runs += 1
                    seconds, failure = time_one(
                        bench, method, settings[setting], Path(tmp) / f"orthanc-{runs}"
                    )
                    row = results.setdefault(f"{label}|{method}", Result(label, method))
                    row.seconds.append(seconds)
                    if failure:
                        row.failures.append(failure)
                    print(f"  {label:>16}  {method:<24} {seconds:7.2f} s {failure}", flush=True)
        print_table(results, bench)
    return 1 if any(r.failures for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
