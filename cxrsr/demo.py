"""A newcomer's first run: public chest X-rays, downloaded and checked, for ``./run.sh --demo``.

Each file is pinned three ways: a repository, a commit and a SHA-256. The bytes at those
commits were checked to equal the copies in the project's shared test corpus, so a file
that arrives with another digest is not the file we mean and is not kept. The licences
are printed with every download, since the images come from other people's work.

Command line (``run.sh --demo`` runs it)::

    python -m cxrsr.demo [--dir data/demo] [--base-url URL]

``--base-url`` (or ``CXRSR_DEMO_BASE_URL``) replaces ``https://raw.githubusercontent.com``,
for a mirror, or for the tests' local server.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import urllib3

from cxrsr import cli
from cxrsr.config import PROJECT_ROOT
from cxrsr.files import write_atomic

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
DEFAULT_DIR = PROJECT_ROOT / "data" / "demo"
#: No demo file is larger than 5 MB; anything far larger is not what we asked for.
MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class DemoFile:
    """One public chest X-ray at a pinned commit of a public repository."""

    name: str
    repository: str
    commit: str
    path: str
    sha256: str
    licence: str
    description: str

    def url(self, base_url: str) -> str:
        """Where the file is: ``<base>/<owner>/<repo>/<commit>/<path>``, GitHub's raw layout."""
        return f"{base_url.rstrip('/')}/{self.repository}/{self.commit}/{quote(self.path)}"


#: Four chest radiographs in four encodings; the same bytes as the shared corpus's copies
#: (``../shared/cxr-corpus``, see its MANIFEST.tsv), checked at these commits.
DEMO_FILES: tuple[DemoFile, ...] = (
    DemoFile(
        "cxr_nema_cr_jpegls.dcm",
        "pydicom/pylibjpeg-data",
        "916aa154a06ac6e85678d8bcffe4273814752c96",
        "ljdata/ds/JPEGLS/RG1_JLSN.dcm",
        "e04e2bdd3b433d7f76f63c60d50bb5ad9564c3cddcf2e8fcb6efb8801806af4e",
        "repository MIT (with GDCM's BSD-3 notice in its LICENSE); image from the NEMA WG04 "
        "test set",
        "CR chest, MONOCHROME1, 15-bit, JPEG-LS near-lossless, 1955x1841",
    ),
    DemoFile(
        "cxr_canon_dx_j2k.dcm",
        "pydicom/pylibjpeg-data",
        "916aa154a06ac6e85678d8bcffe4273814752c96",
        "ljdata/ds/JPEG2000Lossless/966_fixed.dcm",
        "0c92b98d23e74d448fea2d1b2abbb10d0e69da1a6d15ff3a43887ea2c5ad45b2",
        "repository MIT (with GDCM's BSD-3 notice in its LICENSE)",
        "DX chest PA, MONOCHROME1 with Presentation LUT INVERSE, JPEG 2000 lossless, 2128x2000",
    ),
    DemoFile(
        "cxr_nih_dx.dcm",
        "nhsx/covid-chest-imaging-database",
        "4ae27e64b5b9dea6dd563b7b1ee9c0073bd24dfd",
        "warehouse-loader/tests/test_data/"
        "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
        "cbf4d301b7e33923707b6cdeda3953e818ee8e6bc817f26fc127cd78eb6cff6d",
        "repository MIT; image from NIH ChestX-ray14 (NIH Clinical Center: unrestricted use, "
        "please cite Wang et al., CVPR 2017)",
        "DX chest, 8-bit, uncompressed, 1024x1024",
    ),
    DemoFile(
        "cxr_siim_cr_jpeg.dcm",
        "mlmed/torchxrayvision",
        "f4087a0b0d0cdc6a5877fb5456965b6d29adb1e5",
        "tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        "13d378bfe1af0724e8cbe51adde36882cfdc6a69361c8a48ac30f688c3af7613",
        "repository Apache-2.0; image from the SIIM-ACR Pneumothorax challenge (derived from "
        "NIH ChestX-ray14)",
        "CR chest PA, 8-bit JPEG baseline, 1024x1024",
    ),
)


class DownloadError(Exception):
    """One demo file could not be fetched, or arrived with other bytes than pinned."""


@dataclass
class DemoOutcome:
    downloaded: list[Path] = field(default_factory=list)
    present: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.present + self.downloaded


def sha256_of(path: Path) -> str | None:
    """The file's SHA-256, or ``None`` when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def download(http: urllib3.PoolManager, demo: DemoFile, base_url: str) -> bytes:
    """The file's bytes, only when their SHA-256 is the pinned one."""
    url = demo.url(base_url)
    try:
        response = http.request("GET", url, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    try:
        if response.status != 200:
            raise DownloadError(f"{url}: HTTP {response.status} {response.reason or ''}".rstrip())
        digest, chunks, size = hashlib.sha256(), [], 0
        for chunk in response.stream(1 << 16):
            size += len(chunk)
            if size > MAX_BYTES:
                raise DownloadError(f"{url}: more than {MAX_BYTES >> 20} MiB; not a demo file")
            digest.update(chunk)
            chunks.append(chunk)
    except urllib3.exceptions.HTTPError as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    finally:
        response.release_conn()
    if digest.hexdigest() != demo.sha256:
        raise DownloadError(
            f"{url}: SHA-256 {digest.hexdigest()} is not the pinned {demo.sha256}; not saved"
        )
    return b"".join(chunks)


def fetch_demo(
    target: Path,
    base_url: str = DEFAULT_BASE_URL,
    files: Sequence[DemoFile] = DEMO_FILES,
    http: urllib3.PoolManager | None = None,
) -> DemoOutcome:
    """Put ``files`` into ``target``: each file already there with the right digest is kept,
    every other one is downloaded, checked and written atomically. A failure is recorded
    (one line naming the URL and the reason) and the others go on."""
    http = http or urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=60),
        retries=urllib3.Retry(total=3, backoff_factor=0.5, status_forcelist=(502, 503, 504)),
    )
    outcome = DemoOutcome()
    for demo in files:
        path = Path(target) / demo.name
        if sha256_of(path) == demo.sha256:
            outcome.present.append(path)
            continue
        try:
            data = download(http, demo, base_url)
        except DownloadError as exc:
            outcome.failed.append(f"{demo.name}: {exc}")
            continue
        write_atomic(path, data)
        outcome.downloaded.append(path)
    return outcome


def parse_args(argv: Sequence[str] | None):
    parser = cli.make_parser(
        "python -m cxrsr.demo",
        description="Download a handful of public chest X-ray DICOM files for a first run, "
        "each checked against its pinned SHA-256, and print their sources and licences.",
        fatal_reasons="no demo file could be fetched",
    )
    parameters = parser.add_argument_group("parameters")
    parameters.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        metavar="DIR",
        help="where the files go (default: data/demo in the project)",
    )
    parameters.add_argument(
        "--base-url",
        default=os.environ.get("CXRSR_DEMO_BASE_URL") or DEFAULT_BASE_URL,
        metavar="URL",
        help="a mirror with GitHub's raw layout <owner>/<repo>/<commit>/<path> "
        f"(default: $CXRSR_DEMO_BASE_URL or {DEFAULT_BASE_URL})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args)
    for demo in DEMO_FILES:
        cli.log.info(
            "%s: %s; from %s@%s %s; licence: %s",
            demo.name,
            demo.description,
            demo.repository,
            demo.commit[:12],
            demo.path,
            demo.licence,
        )
    outcome = fetch_demo(args.dir, args.base_url)
    for failure in outcome.failed:
        cli.log.error(failure)
    cli.summary(
        f"{len(outcome.files)} demo files in {args.dir} ({len(outcome.downloaded)} downloaded, "
        f"{len(outcome.present)} already there), {len(outcome.failed)} failed"
    )
    if not outcome.files:
        return cli.EXIT_FATAL
    return cli.EXIT_FAILED if outcome.failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
