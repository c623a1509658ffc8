"""Sharded results: an archive's results as many small files, written as they are produced.

One ``results.json`` holds every entry, and a million entries make a file of gigabytes
that no step can load. The sharded layout keeps the same entries in small JSON Lines
files, each complete on its own, so that writing, reading and resuming stay flat in
memory however many images there are::

    output/results.json          the manifest (format cxrsr-results-sharded/1)
    output/results.d/part-00000.jsonl
    output/results.d/part-00001.jsonl
    ...
    output/results.parquet       one row per image: identity, status, reason, scores

A shard file is one header line, then one results entry per line (the very entries of a
``results.json``, in input order)::

    {"format": "cxrsr-shard/1", "shard": 42, "count": 64, "inputs_sha256": "...",
     "model": {...the model block...}, "statuses": {"classified": 60, ...}}
    {"path": "...", "status": "classified", ...}

It is written to a temporary name, flushed, and renamed into place: a shard file that
exists is complete, and is its own marker for a resumed run. ``inputs_sha256`` digests
the names and fingerprints of the shard's inputs and the model and options that made
its entries; a rerun reuses a shard whose digest it computes again, and redoes the
others. The manifest names the shards in order; it too is written by an atomic rename,
at the end of a run (``"complete": false`` after Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

from cxrsr.files import FILE_MODE, fsync_folder, make_folders, write_json_atomic
from cxrsr.results_types import FORMAT, ModelRecord, ResultsEntry, problem

MANIFEST_FORMAT: Final = "cxrsr-results-sharded/1"
SHARD_FORMAT: Final = "cxrsr-shard/1"
SHARD_PATTERN = re.compile(r"^part-(\d{5,})\.jsonl$")


class ShardHeader(TypedDict):
    """The first line of a shard file."""

    format: Literal["cxrsr-shard/1"]
    shard: int
    count: int
    inputs_sha256: str
    model: ModelRecord
    statuses: dict[str, int]


class Manifest(TypedDict):
    """The results file of a sharded run: what the shards are and which model made them."""

    format: Literal["cxrsr-results-sharded/1"]
    entries_format: Literal["cxrsr-results/1"]
    model: ModelRecord
    shards: list[str]
    """Shard files in input order, relative to the manifest's folder."""
    count: int
    statuses: dict[str, int]
    parquet: NotRequired[str]
    """The scores table, relative to the manifest's folder."""
    complete: NotRequired[bool]


def shard_folder(results_path: Path) -> Path:
    """Where the shards of the results file ``results_path`` go: ``results.d`` beside it."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.stem + ".d")


def parquet_path(results_path: Path) -> Path:
    """The scores table of ``results_path``: ``results.parquet`` beside it."""
    return Path(results_path).with_suffix(".parquet")


def shard_name(number: int) -> str:
    return f"part-{number:05d}.jsonl"


def inputs_digest(items: Iterable[tuple[str, object]], model_key: object) -> str:
    """The digest of a shard's inputs (name and fingerprint each) and of the model key."""
    digest = hashlib.sha256()
    digest.update(_canonical(model_key))
    for name, mark in items:
        digest.update(b"\n")
        digest.update(_canonical([name, mark]))
    return digest.hexdigest()


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _line(value: object) -> bytes:
    return (
        json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        + b"\n"
    )


def write_shard(
    folder: Path,
    number: int,
    inputs_sha256: str,
    model: ModelRecord,
    entries: Sequence[ResultsEntry],
) -> Path:
    """Write one complete shard file by an atomic rename; return its path.

    The bytes are flushed before the rename and the folder after it, so a shard file
    that exists after any crash is whole, and durable once this returns.
    """
    make_folders(folder)
    statuses: dict[str, int] = {}
    for entry in entries:
        statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
    header: ShardHeader = {
        "format": SHARD_FORMAT,
        "shard": number,
        "count": len(entries),
        "inputs_sha256": inputs_sha256,
        "model": model,
        "statuses": statuses,
    }
    target = folder / shard_name(number)
    temporary = folder / f".{target.name}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_line(header))
            for entry in entries:
                fh.write(_line(entry))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(folder)
    return target


def read_header(path: Path) -> ShardHeader | None:
    """The header of the shard file at ``path``; ``None`` if it is not a shard file."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
        header = json.loads(first)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        return None
    for key, kind in (("shard", int), ("count", int), ("inputs_sha256", str), ("model", dict)):
        if not isinstance(header.get(key), kind):
            return None
    return cast(ShardHeader, header)


def iter_shard(path: Path) -> Iterator[object]:
    """The entries of one shard file, unchecked, one line at a time."""
    with open(path, "rb") as fh:
        fh.readline()  # the header
        for raw in fh:
            if raw.strip():
                yield json.loads(raw)


def finished_shards(folder: Path) -> dict[int, ShardHeader]:
    """The complete shard files in ``folder``, by number (read from their headers only)."""
    found: dict[int, ShardHeader] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        match = SHARD_PATTERN.match(name)
        if match is None:
            continue
        header = read_header(folder / name)
        if header is not None and header["shard"] == int(match.group(1)):
            found[header["shard"]] = header
    return found


def write_manifest(
    results_path: Path,
    model: ModelRecord,
    shards: Sequence[int],
    statuses: Mapping[str, int],
    parquet: Path | None,
    complete: bool,
) -> None:
    """Write the manifest (the results file of a sharded run) by an atomic rename."""
    results_path = Path(results_path)
    folder = shard_folder(results_path)
    manifest: Manifest = {
        "format": MANIFEST_FORMAT,
        "entries_format": FORMAT,
        "model": model,
        "shards": [f"{folder.name}/{shard_name(number)}" for number in shards],
        "count": sum(statuses.values()),
        "statuses": dict(statuses),
    }
    if parquet is not None:
        manifest["parquet"] = os.path.relpath(parquet, results_path.parent)
    if not complete:
        manifest["complete"] = False
    write_json_atomic(results_path, manifest)


def is_manifest(document: object) -> bool:
    return isinstance(document, dict) and document.get("format") == MANIFEST_FORMAT


def manifest_problem(document: Mapping[str, Any]) -> str | None:
    """What makes ``document`` not a usable manifest, or ``None``."""
    found = problem(document.get("model"), ModelRecord, "model")
    if found is not None:
        return found
    shards = document.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        return "shards: not a list of file names"
    if any(os.path.isabs(s) or ".." in Path(s).parts for s in shards):
        return "shards: a shard outside the results folder"
    return None


class ShardedEntries(Sequence[object]):
    """The entries of a manifest's shards, read one shard at a time as they are iterated.

    Iterating holds one line in memory; ``len`` comes from the manifest; indexing reads
    forward (for the few readers that index: prefer iterating).
    """

    def __init__(self, folder: Path, shards: Sequence[str], count: int) -> None:
        self._folder = Path(folder)
        self._shards = list(shards)
        self._count = count

    def __iter__(self) -> Iterator[object]:
        for name in self._shards:
            yield from iter_shard(self._folder / name)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self._count
        for position, entry in enumerate(self):
            if position == index:
                return entry
        raise IndexError(index)


# --------------------------------------------------------------------------- Parquet


#: Identity columns of the scores table (each a string, null where the entry has none).
PARQUET_COLUMNS = (
    "path",
    "status",
    "reason",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "patient_id",
    "modality",
    "projection",
    "classified_at",
)


def write_parquet(target: Path, labels: Sequence[str], shard_files: Iterable[Path]) -> Path:
    """Write the scores table (one row per entry, one float column per label) from shards.

    One row group per shard: memory holds one shard's rows at a time. Written to a
    temporary name and renamed. Needs ``pyarrow`` (installed with Ray).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field(name, pa.string()) for name in PARQUET_COLUMNS]
    fields.append(pa.field("findings", pa.list_(pa.string())))
    fields += [pa.field(label, pa.float64()) for label in labels]
    schema = pa.schema(fields)
    temporary = target.with_name(f".{target.name}.tmp")
    with pq.ParquetWriter(temporary, schema) as writer:
        for shard in shard_files:
            rows = [_row(entry, labels) for entry in iter_shard(shard) if isinstance(entry, dict)]
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    os.chmod(temporary, FILE_MODE)
    os.replace(temporary, target)
    return target


def _row(entry: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {name: _text(entry.get(name)) for name in PARQUET_COLUMNS}
    found = entry.get("scores")
    scores: Mapping[str, object] = found if isinstance(found, dict) else {}
    row["findings"] = entry.get("findings") if isinstance(entry.get("findings"), list) else None
    for label in labels:
        value = scores.get(label)
        row[label] = float(value) if isinstance(value, int | float) else None
    return row


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
