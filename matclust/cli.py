"""The command line: a thin layer over the API, the store and the sources.

Exit codes (README.md): 0 success; 2 bad usage or bad input, as one ``error:`` line on stderr;
1 anything else (and ``verify`` finding a cluster over eps).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
from operator import itemgetter

# OpenBLAS's idle worker threads busy-wait for 2^28 cycles (~0.1 s) after each threaded product
# before they sleep. In-memory clustering runs one such product every few milliseconds, so the
# second core spun through the whole run: 192% CPU for 123% of work on 10,000 MiniLM columns,
# with the same wall time as 2^16 cycles (~20 us). That core belongs to the user's other jobs.
# Read when OpenBLAS loads, so before numpy is imported; a value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

import click  # noqa: E402
import numpy as np  # noqa: E402

from matclust import __version__, defaults
from matclust.errors import InputError, WriteFailure
from matclust.safety import (check_target, disk_full_reason, refuse_clashes,
                             require_path, write_text_atomically)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


#: A size: a decimal number (optionally with an exponent), then an optional binary unit.
_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
#: Larger sizes are certainly typing mistakes (and would overflow 64-bit arithmetic).
_MAX_SIZE = 2**60


def parse_size(text, option: str = "--memory-limit") -> int:
    """'1GiB', '512M', '2e9' or a plain number of bytes; anything else, zero, negative,
    infinite or NaN is an InputError naming ``option``."""
    match = _SIZE.fullmatch(str(text))
    if isinstance(text, bool) or not match:
        raise InputError(f"{option}: '{text}' is not a size like 1GiB, 512M or 2e9 (bytes)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not 1 <= value <= _MAX_SIZE:  # also false for inf and nan
        raise InputError(f"{option}: '{text}' is not a size between 1 byte and 1 EiB")
    return int(value)


def _size_callback(ctx, param, value):
    return None if value is None else parse_size(value, "--memory-limit")


def memory_limit_option(default: str = "1GiB"):
    """--memory-limit, parsed to bytes as the command line is read (so a config file's value is
    checked too). The limit covers the peak resident memory of the whole process."""
    return click.option("--memory-limit", default=default, show_default=True,
                        callback=_size_callback,
                        help="Most memory the process may use, e.g. 1GiB, 512M (peak resident set).")


def format_size(n: int) -> str:
    """A byte count as parse_size reads it, in the largest binary unit that divides it (help
    texts show defaults this way: 1GiB)."""
    for unit, size in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}iB"
    return str(n)


def json_text(document) -> str:
    """``document`` as JSON indented by two spaces, but with every object of a list of objects
    on one line of its own (a report's ``cluster_stats``): json indents in pure Python, which
    took twice as long for the 59,068 cluster statistics of a MiniLM store. Never NaN."""
    return _json_at(document, "")


_FLAT = json.JSONEncoder(allow_nan=False)


def _json_at(value, pad: str) -> str:
    inner = pad + "  "
    if isinstance(value, dict) and value:
        return "{\n" + ",\n".join(f"{inner}{_json_key(key)}: {_json_at(item, inner)}"
                                   for key, item in value.items()) + f"\n{pad}}}"
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        rows = _table_rows(value, inner)
        if rows is None:
            rows = [inner + _FLAT.encode(item) for item in value]
        return "[\n" + ",\n".join(rows) + f"\n{pad}]"
    return json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n" + pad)


#: How a value of each type is written by json (floats as float.__repr__, as json does).
_SCALAR_TEXT = {int: int.__repr__, float: float.__repr__, str: _FLAT.encode}


def _table_rows(items: list[dict], pad: str) -> list[str] | None:
    """The objects ``items`` as :data:`_FLAT` writes them, each after ``pad``, when all have
    the same keys in the same order and each key's values one type (int, float or str): the
    case of a report's ``cluster_stats``. Formatted a column at a time: with an encoder call
    for each object, the report of 27,648 MiniLM clusters took 0.17 s to write, so 0.13 s
    (most of it the floats' repr, which json uses too). None for any other list. Like json,
    a value that is not a finite number raises ValueError."""
    keys = tuple(items[0])
    if not keys or any(tuple(item) != keys for item in items):
        return None
    texts = []
    for key in keys:
        column = list(map(itemgetter(key), items))
        kinds = set(map(type, column))
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind not in _SCALAR_TEXT:
            return None
        if kind is float and not all(map(math.isfinite, column)):
            raise ValueError("Out of range float values are not JSON compliant")
        if kind is str:  # a few words repeated ("factored", "raw"): each encoded once
            texts.append(list(map({v: _FLAT.encode(v) for v in set(column)}.__getitem__,
                                  column)))
        else:
            texts.append(list(map(_SCALAR_TEXT[kind], column)))
    template = pad + "{" + ", ".join(_FLAT.encode(key).replace("%", "%%") + ": %s"
                                     for key in keys) + "}"
    return [template % row for row in zip(*texts)]


def _json_key(key) -> str:
    """A key as json writes it (a number, true, false or null becomes a string)."""
    return _FLAT.encode(key) if isinstance(key, str) else json.dumps({key: 0})[1:-4]


def _emit_json(document) -> None:
    click.echo(json_text(document))


# ---------------------------------------------------------------------------------------------
# --config: an eager option that fills the command's defaults from a TOML file
# ---------------------------------------------------------------------------------------------
def _config_callback(ctx: click.Context, param, value):
    if not value:
        return value
    from matclust.config import load_config

    allowed, kinds = {}, {}
    for p in ctx.command.params:
        if p.name in ("config",):
            continue
        kinds[p.name] = _config_kind(p)
        allowed[p.name] = p.name
        allowed[p.name.replace("_", "-")] = p.name
        for opt in getattr(p, "opts", []):  # the flag's own spelling: report = "...", json = true
            if opt.startswith("--"):
                allowed[opt[2:]] = p.name
                allowed[opt[2:].replace("-", "_")] = p.name
    ctx.default_map = {**(ctx.default_map or {}), **load_config(value, allowed, kinds)}
    return value


def _config_kind(param) -> str | None:
    """What a config value for this option must be (see matclust.config)."""
    if getattr(param, "is_flag", False) or isinstance(param.type, click.types.BoolParamType):
        return "flag"
    if isinstance(param.type, click.types.IntParamType):
        return "integer"
    if isinstance(param.type, click.types.FloatParamType):
        return "number"
    if getattr(param, "multiple", False):
        return None  # a list is fine (e.g. methods = ["incremental", "kmeans"])
    return "text"


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=True,
    callback=_config_callback, help="TOML file supplying any option; flags override it.")


def _storage_options_callback(ctx, param, value):
    """Parse --storage-options and put it in force for the command (matclust.locations)."""
    if value is None:
        return None
    from matclust.locations import parse_storage_options, use_storage_options

    ctx.with_resource(use_storage_options(parse_storage_options(value)))
    return None


storage_options_option = click.option(
    "--storage-options", metavar="JSON", callback=_storage_options_callback, expose_value=False,
    help="fsspec options for every URL (s3://, gs://, ...) the command opens, as a JSON object, "
         "e.g. '{\"anon\": true}' or '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'; "
         "credentials and endpoints also come from the usual environment variables.")


fill_missing_option = click.option(
    "--fill-missing", is_flag=True,
    help="Read Zarr chunks that are not stored, and virtual-dataset sources that are missing, as "
         "the fill value (default: an error naming them and the matrices they hold).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="matclust")
@click.option("-v", "--verbose", count=True,
              help="Log what the run does on stderr: -v its stages, -vv every cluster.")
def cli(verbose):
    """Cluster matrix collections so each cluster shares one truncated-SVD basis, with every
    cluster's relative error guaranteed <= eps (Shamrai, arXiv:2601.11626)."""
    _configure_logging(verbose)


def _configure_logging(verbosity: int) -> None:
    """Send matclust's log records to stderr: INFO with -v, DEBUG with -vv. Without -v nothing
    is configured (the library logs nothing above INFO), so the output is unchanged."""
    import logging

    package = logging.getLogger("matclust")
    for handler in [h for h in package.handlers if getattr(h, "matclust_cli", False)]:
        package.removeHandler(handler)  # from an earlier run in the same process
        package.setLevel(logging.NOTSET)
    if not verbosity:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.matclust_cli = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)


# ---------------------------------------------------------------------------------------------
# cluster
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("input", required=False)
@click.option("-o", "--output", help="Result store: HDF5 if it ends in .h5/.hdf5, else Zarr (always Zarr at a URL such as s3://...).")
@click.option("--rank", type=int, help="Target rank r of each cluster's shared basis.")
@click.option("--eps", type=float, help="Relative Frobenius error bound per cluster, in (0, 1).")
@click.option("--method", default=defaults.METHOD, show_default=True,
              help="Bound: incremental | residual | weyl (aliases approximate | residuals | max_norm); "
                   "or a baseline without error control: random | kmeans | hdbscan.")
@click.option("--order", default=defaults.ORDER, show_default=True, help="Candidate order: residual | norm.")
@click.option("--dataset", help="Path of the collection inside INPUT (default: the only candidate).")
@click.option("--transpose/--no-transpose", default=False, help="Cluster the transposes (shared column space).")
@click.option("--patience", type=int, default=defaults.PATIENCE, show_default=True,
              help="After N clusters in a row that did not grow past their seed, store the rest as singletons (0: never).")
@click.option("--oversampling", type=int, default=defaults.OVERSAMPLING, show_default=True,
              help="Extra directions tracked by the incremental estimator.")
@memory_limit_option()
@click.option("--mode", type=click.Choice(["auto", "in-memory", "out-of-core"]), default="auto",
              show_default=True,
              help="in-memory: the matrices themselves, exhaustive candidate order; out-of-core: "
                   "per-matrix summaries within --memory-limit; auto: out-of-core when the data do not fit, "
                   "or exceed 32 MiB and the matrices are wider than --rank.")
@click.option("--guarantee", type=click.Choice(["matrix", "cluster"]), default=defaults.GUARANTEE,
              show_default=True,
              help="matrix: every matrix within eps of itself, as stored; cluster: every cluster "
                   "(the paper's guarantee).")
@click.option("--encoding", type=click.Choice(["compact", "plain"]), default=defaults.ENCODING,
              show_default=True,
              help="compact: the smallest store (quantised codes within the error budget); plain: "
                   "float bases and coefficients at the input's precision (matclust/1 layout).")
@click.option("--clusters", "n_clusters", type=int, help="Number of clusters (--method random | kmeans).")
@click.option("--seed", type=int, default=defaults.SEED, show_default=True, help="Seed of --method random | kmeans.")
@config_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout and nothing else.")
@click.option("--quiet", is_flag=True, help="No progress bars and no table.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run on OUTPUT from its checkpoint (same input and options).")
@fill_missing_option
@storage_options_option
@click.option("--workers", type=int,
              help="Run on a local Dask cluster of this many single-threaded worker processes.")
@click.option("--scheduler", help="Run on the Dask cluster whose scheduler is at this address.")
@click.option("--shards", type=int,
              help="Cut the collection into this many shards, planned apart and then merged "
                   "(default with --workers/--scheduler: from the collection and the workers).")
def cluster(input, output, rank, eps, method, order, dataset, transpose, patience, oversampling,
            memory_limit, mode, guarantee, encoding, n_clusters, seed, config, report_path, as_json,
            quiet, overwrite, resume, fill_missing, workers, scheduler, shards):
    """Cluster the matrices in INPUT and write the result store OUTPUT."""
    from matclust.api import MatrixClusterer
    from matclust.progress import RichProgress
    from matclust.report import render_table
    from matclust.sources import open_source

    for name, value in (("INPUT", input), ("-o/--output", output), ("--rank", rank), ("--eps", eps)):
        if value is None:
            raise click.UsageError(f"missing {name} (give it on the command line or in --config)")
    # Every path is checked before any work: none may be, hold or lie inside another, and
    # only what matclust wrote is ever replaced (matclust.safety).
    output = require_path(output, "-o/--output")
    refuse_clashes(("output", output), [("input", input)])
    check_target(output, overwrite, "result")
    if report_path is not None:
        report_path = require_path(report_path, "--report")
        refuse_clashes(("report", report_path), [("output", output), ("input", input)])
        check_target(report_path, overwrite, "report", what="report")
    clusterer = MatrixClusterer(rank=rank, eps=eps, method=method, order=order, patience=patience,
                                oversampling=oversampling, memory_limit=memory_limit,
                                n_clusters=n_clusters, random_state=seed, mode=mode,
                                guarantee=guarantee, encoding=encoding, shards=shards)
    clusterer._validated()  # bad parameters fail before the input is opened
    runner = None
    if workers is not None or scheduler is not None:
        from matclust.distributed import make_runner  # Dask only for a distributed run

        runner = make_runner(workers, scheduler)
    with open_source(input, dataset, transpose, fill_missing) as source, \
            _closing(runner):
        extra = {"config": os.path.abspath(config) if config else None}
        if fill_missing:  # verify then reads the input the same way
            extra["fill_missing"] = True
        with RichProgress(enabled=None if not quiet else False) as progress:
            clusterer.fit(source, output, overwrite=overwrite, progress=progress, extra_params=extra,
                          resume=resume, runner=runner)
    report = clusterer.report_
    if report_path:
        write_text_atomically(report_path, json_text(report),
                              f"report (the result store {output} was written)")
    if as_json:
        _emit_json(report)
    elif not quiet:
        render_table(report, _console())


@contextlib.contextmanager
def _closing(runner):
    """Stops a distributed run's cluster (or leaves the scheduler it joined) at the end."""
    try:
        yield
    finally:
        if runner is not None:
            runner.close()


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("output")
@click.option("--input", "input_path", help="The input collection (default: as recorded in the store).")
@click.option("--dataset", help="Dataset inside the input (default: as recorded).")
@click.option("--json", "as_json", is_flag=True, help="Print the verification as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@fill_missing_option
@memory_limit_option()
@storage_options_option
def verify(output, input_path, dataset, as_json, quiet, fill_missing, memory_limit):
    """Recompute every cluster's error from the input; exit 1 if one exceeds eps."""
    from matclust.progress import RichProgress
    from matclust.verify import verify_store

    with RichProgress(enabled=None if not quiet else False) as progress:
        result = verify_store(output, input_path, dataset, memory_limit=memory_limit,
                              progress=progress, fill_missing=fill_missing or None)
    if as_json:
        _emit_json(result)
    else:
        console = _console()
        status = "[green]OK[/green]" if result["ok"] else "[red]FAILED[/red]"
        guarantee = result.get("guarantee", "cluster")
        worst = result.get("worst_matrix")
        matrix = (f", worst matrix {worst}: {result['max_matrix_error']:.4g}"
                  if worst is not None else "")
        console.print(f"{status}: {result['clusters']} clusters ({guarantee} guarantee), max "
                      f"cluster error {result['max_error']:.4g} (eps {result['eps']}){matrix}, "
                      f"{len(result['over_eps'])} over eps")
        for c in result["over_eps"][:20]:
            if guarantee == "matrix" and "worst_matrix" in result:  # only the worst's is known
                error = f" {result['max_matrix_error']:.4g}" if c == worst else ""
                console.print(f"  matrix {c}: error{error} > eps")
                continue
            error = result["errors"][c]  # None: infinite
            console.print(f"  cluster {c}: error "
                          f"{'inf' if error is None else format(error, '.4g')} > eps")
        for problem in result["problems"]:
            console.print(f"  {problem}")
    sys.exit(0 if result["ok"] else 1)


# ---------------------------------------------------------------------------------------------
# reconstruct
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("output")
@click.option("-o", "--dest", "dest", required=True, help="Collection to write (HDF5 or Zarr by name).")
@click.option("--index", "indices", type=int, multiple=True, help="Input index to rebuild (repeatable; default all).")
@click.option("--overwrite", is_flag=True, help="Replace an existing DEST.")
@memory_limit_option()
@storage_options_option
def reconstruct(output, dest, indices, overwrite, memory_limit):
    """Rebuild matrices from the result store OUTPUT into DEST (same layout as the input)."""
    from matclust.collections_io import write_collection
    from matclust.store import ResultStore
    from matclust.verify import reconstruct as rebuild

    dest = require_path(dest, "-o/--dest")
    with ResultStore(output) as store:  # a damaged store fails before DEST is looked at
        recorded_input = store.params.get("input")
    # DEST may replace only a collection matclust wrote, never the store or its input.
    refuse_clashes(("DEST", dest), [("result store", output), ("store's input", recorded_input)])
    check_target(dest, overwrite, "collection", what="DEST")
    pairs, names, params = rebuild(output, list(indices), memory_limit)
    mats = [m for _, m in pairs]
    dataset = params.get("dataset") or "matrices"
    dataset = "matrices" if dataset in ("/", "") else dataset
    same_width = len({m.shape for m in mats}) == 1
    if names is None and same_width:
        write_collection(dest, np.stack(mats), layout="stack", dataset=dataset, overwrite=overwrite)
    else:
        member_names = [names[i] for i, _ in pairs] if names is not None else None
        write_collection(dest, mats, layout="group", dataset=dataset, names=member_names,
                         overwrite=overwrite)
    click.echo(f"wrote {len(mats)} matrices to {dest}", err=True)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("input")
@click.option("--dataset", help="Describe only this dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@storage_options_option
def inspect(input, dataset, as_json):
    """Describe the candidate collections in INPUT (or summarise a result store)."""
    from matclust.sources import list_candidates, open_source

    store_summary = _result_summary(input)
    if store_summary is not None:
        found = [store_summary]
    elif dataset is not None:
        with open_source(input, dataset) as src:
            found = [src.summary()]
    else:
        found = list_candidates(input)
    if as_json:
        _emit_json(found)
        return
    from rich.table import Table

    if store_summary is not None:
        table = Table(title=f"{input}: matclust result store", show_header=False, title_justify="left")
        for key, value in store_summary.items():
            table.add_row(key, str(value))
    else:
        table = Table(title=f"{input}: {len(found)} candidate collection(s)", title_justify="left")
        cols = ["dataset", "layout", "K", "m", "n_min", "n_max", "input_dtype", "dtype", "chunk_len"]
        for col in cols:
            table.add_column(col, justify="right")
        for row in found:
            table.add_row(*(str(row[c]) for c in cols))
    _console().print(table)


def _result_summary(path: str):
    """A result store's headline numbers, or None when ``path`` is not a result store."""
    from matclust.store import ResultStore

    try:
        store = ResultStore(path)
    except InputError:
        return None
    with store:
        r = store.report
        return {"kind": "matclust result store", "input": store.params.get("input"),
                "inputs": len(store.params.get("inputs") or [None]),  # grown by appends
                "method": store.params.get("method"), "order": store.params.get("order"),
                "rank": store.params.get("rank"), "eps": store.params.get("eps"),
                "K": r["K"], "m": r["m"], "clusters": r["clusters"], "singletons": r["singletons"],
                "compression_ratio": r["compression_ratio"], "max_error": r["max_error"],
                "format": store.format, "guarantee": r.get("guarantee", "cluster"),
                "encoding": r.get("encoding", "plain"),
                "max_matrix_error": r.get("max_matrix_error"), "file_bytes": r.get("file_bytes"),
                "bytes_ratio": r.get("bytes_ratio")}


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("dest")
@click.option("-K", "--count", "K", type=int, default=1000, show_default=True, help="Number of matrices.")
@click.option("-m", "--rows", "m", type=int, default=32, show_default=True, help="Rows per matrix.")
@click.option("-n", "--cols", "n", type=int, default=8, show_default=True, help="Columns per matrix (minimum with --cols-max).")
@click.option("--cols-max", "n_max", type=int, help="Draw widths uniformly in [n, cols-max] (group layout).")
@click.option("--subspaces", type=int, default=8, show_default=True, help="Number of planted subspaces.")
@click.option("--rank", type=int, default=4, show_default=True, help="Rank of each planted subspace.")
@click.option("--noise", type=float, default=0.01, show_default=True, help="Relative noise level.")
@click.option("--scale-spread", type=float, default=10.0, show_default=True, help="Spread of norms (max/min).")
@click.option("--dtype", type=click.Choice(["float16", "float32", "float64", "int32", "int64", "complex64", "complex128"]),
              default="float32", show_default=True)
@click.option("--layout", type=click.Choice(["stack", "group"]), default="stack", show_default=True,
              help="A 3-D array, or a group of 2-D arrays.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default="3", show_default=True,
              help="Zarr store version (when DEST is not .h5/.hdf5).")
@click.option("--dataset", default="matrices", show_default=True, help="Name of the collection in DEST.")
@click.option("--chunk", "chunk_len", type=int, help="Matrices per storage chunk (stack layout).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing DEST.")
def sample(dest, K, m, n, n_max, subspaces, rank, noise, scale_spread, dtype, layout, zarr_format,
           dataset, chunk_len, seed, overwrite):
    """Write a planted collection: matrices from random low-rank subspaces plus noise.

    The planted subspace of every matrix is written beside it as `planted_labels`."""
    from matclust.collections_io import write_collection
    from matclust.sample import planted_collection

    for name, value in (("--count", K), ("--rows", m), ("--cols", n), ("--subspaces", subspaces), ("--rank", rank)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if n_max is not None and n_max < n:
        raise InputError(f"--cols-max ({n_max}) must be >= --cols ({n})")
    if not 0 <= noise < float("inf"):
        raise InputError(f"--noise must be a finite number >= 0, got {noise}")
    if not 1 <= scale_spread < float("inf"):
        raise InputError(f"--scale-spread (max/min norm) must be a finite number >= 1, "
                         f"got {scale_spread}")
    dest = require_path(dest, "DEST")
    check_target(dest, overwrite, "collection", what="DEST")
    mats, labels = planted_collection(K, m, n, subspaces, rank, noise, dtype, n_max, seed, scale_spread)
    if layout == "group" and isinstance(mats, np.ndarray):
        mats = list(mats)
    write_collection(dest, mats, layout=layout, dataset=dataset, zarr_format=int(zarr_format),
                     extra={"planted_labels": labels}, overwrite=overwrite, chunk_len=chunk_len)
    click.echo(f"wrote {K} matrices ({layout}, {dtype}) to {dest}:{dataset}", err=True)


# ---------------------------------------------------------------------------------------------
# bounds: the paper's bound study
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("input")
@click.option("--dataset", help="Path of the collection inside INPUT (default: the only candidate).")
@click.option("--transpose/--no-transpose", default=False, help="Study the transposes.")
@click.option("--rank", type=int, required=True, help="Target rank r.")
@click.option("--sizes", default="2:50:4", show_default=True,
              help="Cluster sizes A:B[:STEP] (B included when the step reaches it).")
@click.option("--trials", type=int, default=10, show_default=True, help="Random clusters per size.")
@click.option("--seed", type=int, default=defaults.SEED, show_default=True, help="Seed of the random clusters.")
@click.option("--oversampling", type=int, default=defaults.OVERSAMPLING, show_default=True,
              help="Extra directions tracked by the incremental estimator.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="CSV file: one row per cluster (size, trial, true_error, each bound, seconds).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw true error and bounds against cluster size (PNG; needs matclust[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
@click.option("--overwrite", is_flag=True, help="Replace an existing CSV / plot.")
@fill_missing_option
@memory_limit_option()
@storage_options_option
def bounds(input, dataset, transpose, rank, sizes, trials, seed, oversampling, output, plot_path,
           as_json, quiet, overwrite, fill_missing, memory_limit):
    """The paper's bound study: on random clusters of each size, the exact best rank-r error and
    every estimator's bound. Exits 1 if any bound falls below the exact error."""
    from matclust.progress import RichProgress
    from matclust.sources import open_source
    from matclust.study import bound_study, parse_sizes, plot_study, require_matplotlib

    size_list = parse_sizes(sizes)
    for path in (output, plot_path):
        if path is not None:
            require_path(path, "-o/--output" if path is output else "--plot")
            refuse_clashes(("output", path), [("input", input)])
            check_target(path, overwrite, "study" if path is output else "plot",
                         what="output" if path is output else "plot")
    if plot_path:
        require_matplotlib()  # a missing extra fails before the study runs
    with open_source(input, dataset, transpose, fill_missing) as source:
        with RichProgress(enabled=None if not quiet else False) as progress:
            progress.start("trials", len(size_list) * max(trials, 0))
            result = bound_study(source, rank, size_list, trials, seed, oversampling,
                                 progress=progress.advance, memory_limit=memory_limit)
    result.write_csv(output)
    if plot_path:
        plot_study(result, plot_path)
    summary = result.summary()
    if as_json:
        _emit_json({"params": result.params, "clusters": len(result.rows),
                    "violations": result.violations, "tightest": result.tightest(),
                    "estimators": summary})
    elif not quiet:
        _render_study(result, summary, _console())
    if result.violations:
        click.echo(f"error: {result.violations} bound(s) fell below the true error "
                   f"(see {output})", err=True)
        sys.exit(1)


def _render_study(result, summary, console) -> None:
    from rich import box
    from rich.table import Table

    p = result.params
    table = Table(title=f"bound study: {p['input']}:{p['dataset']}, rank {p['rank']}, "
                        f"{len(result.rows)} random clusters (sizes {p['sizes'][0]}..{p['sizes'][-1]}, "
                        f"{p['trials']} per size)", title_justify="left", box=box.SIMPLE_HEAD,
                  caption=f"means over the clusters (true error {summary[0]['mean_true_error']:.4f}); "
                          f"ratio = bound / true error; gap = bound - true error; "
                          f"viol. = bounds below the true error; sec = seconds in all; "
                          f"tightest on average: {result.tightest()}",
                  caption_justify="left")
    table.add_column("estimator", no_wrap=True, min_width=20)
    for col in ("bound", "ratio", "gap", "min gap", "viol.", "sec"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in summary:
        viol = f"[red]{s['violations']}[/red]" if s["violations"] else "0"
        table.add_row(s["estimator"], f"{s['mean_bound']:.4f}", f"{s['mean_ratio']:.4f}",
                      f"{s['mean_gap']:.2e}", f"{s['min_gap']:.2e}", viol, f"{s['seconds']:.3f}")
    console.print(table)


# ---------------------------------------------------------------------------------------------
# compare: several methods, one table
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("input")
@click.option("--dataset", help="Path of the collection inside INPUT (default: the only candidate).")
@click.option("--transpose/--no-transpose", default=False, help="Cluster the transposes.")
@click.option("--rank", type=int, required=True, help="Target rank r.")
@click.option("--eps", type=float, required=True, help="Relative error bound per cluster.")
@click.option("--methods", multiple=True,
              help="METHOD[/ORDER], repeatable or comma-separated: incremental | residual | weyl "
                   "(both orders without /ORDER), random | kmeans | hdbscan. Default: the three "
                   "bounded methods with both orders, random and kmeans.")
@click.option("--clusters", "n_clusters", type=int,
              help="Clusters for random / kmeans (default: as many as the first bounded method formed).")
@click.option("--seed", type=int, default=defaults.SEED, show_default=True, help="Seed of random / kmeans.")
@click.option("--patience", type=int, default=defaults.PATIENCE, show_default=True, help="As for cluster.")
@click.option("--oversampling", type=int, default=defaults.OVERSAMPLING, show_default=True, help="As for cluster.")
@memory_limit_option()
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list and nothing else.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@fill_missing_option
@storage_options_option
def compare(input, dataset, transpose, rank, eps, methods, n_clusters, seed, patience,
            oversampling, memory_limit, as_json, quiet, fill_missing):
    """Run several methods on INPUT and print one table (each run's store goes to a temporary
    directory, deleted at the end)."""
    from matclust.compare import compare as run_compare
    from matclust.progress import RichProgress
    from matclust.sources import open_source

    with open_source(input, dataset, transpose, fill_missing) as source:
        with RichProgress(enabled=None if not quiet else False) as progress:
            result = run_compare(source, rank, eps, list(methods) or None, n_clusters=n_clusters,
                                 seed=seed, patience=patience, oversampling=oversampling,
                                 memory_limit=memory_limit, progress=progress)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        _emit_json(result.rows)
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{input}: rank {rank}, eps {eps:g}", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=0, show_edge=False)  # fits 80 columns
    table.add_column("method", no_wrap=True, min_width=20)
    for col in ("clusters", "singletons", "compression\nratio", "max\nerror",
                "clusters\nover eps", "seconds"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in result.rows:
        over = f"[red]{row['over_eps']}[/red]" if row["over_eps"] else "0"
        table.add_row(row["method"], str(row["clusters"]), str(row["singletons"]),
                      f"{row['compression_ratio']:.3f}", f"{row['max_error']:.4f}", over,
                      f"{row['seconds']:.2f}")
    _console().print(table)


# ---------------------------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.argument("store")
@click.argument("input")
@click.option("--dataset", help="Path of the collection inside INPUT (default: the only candidate).")
@click.option("--transpose/--no-transpose", default=None,
              help="Read INPUT's transposes (default: as the store's inputs were read; the other "
                   "choice is refused).")
@memory_limit_option()
@click.option("--json", "as_json", is_flag=True, help="Print the grown store's JSON report and nothing else.")
@click.option("--quiet", is_flag=True, help="No progress bars and no table.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted append of INPUT to STORE from its checkpoint.")
@fill_missing_option
@storage_options_option
def append(store, input, dataset, transpose, memory_limit, as_json, quiet, resume, fill_missing):
    """Add the matrices of INPUT to the result store STORE without clustering it again.

    A new matrix joins a stored cluster when that cluster's stored basis keeps the store's
    guarantee with it; the others are clustered among themselves into new clusters. STORE is
    replaced only once the grown store is complete. STORE and INPUT may be URLs (s3://, ...;
    see docs/objectstores.md)."""
    from matclust.append import append_to_store
    from matclust.progress import RichProgress
    from matclust.report import render_table

    with RichProgress(enabled=None if not quiet else False) as progress:
        report = append_to_store(store, input, dataset, transpose, memory_limit, progress,
                                 fill_missing, resume)
    if as_json:
        _emit_json(report)
    elif not quiet:
        done = report["append"]
        _console().print(f"appended {done['K']} matrices: {done['joined']} joined stored "
                         f"clusters, {done['new_clusters']} new clusters")
        render_table(report, _console())


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
#: Longest error line printed; a longer message is cut in the middle (it names the culprit
#: first and the library's reason last).
MAX_ERROR_CHARS = 400
#: Set (to anything but 0) to print the traceback of an unexpected failure.
DEBUG_ENV = "MATCLUST_DEBUG"


def _error_line(message: str) -> str:
    text = " ".join(str(message).split())
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2 - 3
        text = f"{text[:half]} ... {text[-half:]}"
    return "error: " + text


def main(argv=None) -> None:
    """Run the CLI, mapping errors onto exit codes and one-line messages: 2 for bad usage or
    input, 1 for a failure of the environment (a full disk) and anything unexpected."""
    _terminate_cleanly()
    # zarr reads metadata in asyncio tasks; when one fails (a damaged store, reported as one
    # error line), asyncio would log the others' exceptions as tracebacks.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        cli.main(args=argv, prog_name="matclust", standalone_mode=False)
    except InputError as exc:
        click.echo(_error_line(str(exc)), err=True)
        sys.exit(2)
    except WriteFailure as exc:
        click.echo(_error_line(str(exc)), err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(2)
    except click.UsageError as exc:
        where = f" ({exc.ctx.command_path})" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:  # a bug or the environment: one line, the traceback on request
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            import traceback

            traceback.print_exc()
        reason = disk_full_reason(exc)
        what = f"could not write a file: {reason}" if reason else \
            f"unexpected failure ({type(exc).__name__}: {exc})"
        click.echo(_error_line(f"{what}; set {DEBUG_ENV}=1 for the traceback"), err=True)
        sys.exit(1)
    sys.exit(0)


def run() -> None:
    """The console command (``matclust``, ``python -m matclust``): :func:`main`, then the
    process ends without the interpreter's teardown, which freed every module and object one
    by one: 25-35 ms of each command, a tenth of a small append. What a normal exit does that
    matters is done first: the atexit handlers run (logging, temporary directories, ...),
    stdout and stderr flushed, and no thread left but this one (the pool's are ended). Should
    another thread still run, the output not flush, or a profiler or tracer watch (cProfile,
    coverage, a debugger: they write their results after the command returns), the exit is
    the normal one."""
    import atexit
    import threading

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):
            raise
    from matclust.blas import release_cores

    release_cores()
    if sys.getprofile() is not None or sys.gettrace() is not None or any(
            thread is not threading.current_thread() and not thread.daemon
            for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code or 0)


def _terminate_cleanly() -> None:
    """SIGTERM (``timeout``, ``kill``) unwinds like an error: temporaries are removed, the
    output's lock released and its checkpoint kept for ``--resume``. Exit 143.

    SIGXFSZ (a write past ``ulimit -f``) would kill the process with the temporary store half
    written; ignored, the write fails with EFBIG and is reported like a full disk."""
    import signal

    from matclust.progress import terminate

    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: terminate(signum))
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread (the CLI run inside a test harness)
        pass
