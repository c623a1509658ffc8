"""Where process_dicom.py runs its work: ``local`` (this machine's processes) or ``ray``.

The ``local`` engine is :func:`cxrsr.classify.classify` with reader processes and one
results file. The ``ray`` engine (:mod:`cxrsr.engines.ray_engine`) runs the same reading,
domain gates, preprocessing, model and heatmaps as Ray Data tasks and actors, on this
machine or a cluster, and writes sharded results (:mod:`cxrsr.shards`).
"""

from __future__ import annotations

import argparse

from cxrsr import cli

ENGINES = ("local", "ray")

#: Inputs per shard by default: small enough that a killed run redoes little, large
#: enough that a million images make 15,625 files, not a million.
DEFAULT_SHARD_SIZE = 64


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray engine's options."""
    group = parser.add_argument_group("engine options")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: reader processes on this machine, one results file; ray: Ray Data tasks "
        "and actors on this machine or a cluster, results in shards (FILE's stem .d/) with a "
        "Parquet table of scores, resumed by shard (needs requirements-ray.txt; see "
        "docs/scale.md) (default: %(default)s)",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --engine ray: join this Ray cluster ('auto', HOST:PORT or ray://HOST:10001); "
        "default: start Ray on this machine for the run",
    )
    group.add_argument(
        "--shard-size",
        type=cli.positive_int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help="with --engine ray: inputs per results shard (default: %(default)s)",
    )
    group.add_argument(
        "--ray-actors",
        type=cli.positive_int,
        default=1,
        metavar="N",
        help="with --engine ray: model actors, each holding one model (one per GPU with "
        "--device cuda) (default: %(default)s)",
    )


def run_engine(args: argparse.Namespace) -> int:
    """Run ``args.engine`` other than ``local`` (the results file's lock held)."""
    from cxrsr.engines.ray_engine import process_ray

    return process_ray(args)
