"""The JSON report (its keys: README.md, "Output store") and its rendering as a table."""

from __future__ import annotations

import math
import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0, 1)


def paper_params(rank: int, m: int, columns: int, size: int) -> int:
    """params_S of the paper's compression ratio: min(r (m + N), m N) for two or more blocks,
    m N for a singleton."""
    raw = m * columns
    return raw if size < 2 else min(rank * (m + columns), raw)


def cluster_stat(cid: int, encoded) -> dict:
    return {
        "id": int(cid),
        "size": int(len(encoded.members)),
        "columns": int(encoded.columns),
        "rank": int(encoded.rank),
        "bound": _finite(encoded.bound),
        "error": _finite(encoded.error),
        "stored": encoded.stored,
    }


def _finite(x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError("non-finite value in report")
    return x


def build_report(params: dict, K: int, m: int, rank: int, eps: float, stats: list[dict],
                 stored_numbers: int, input_itemsize: int, stored_itemsize: int,
                 seconds: float, max_matrix_error: float = 0.0) -> dict:
    """Assemble the report from the per-cluster stats. ``file_bytes`` and ``bytes_ratio``
    are filled in once the store is written (0 without one)."""
    input_numbers = m * sum(s["columns"] for s in stats)
    if params.get("encoding") == "compact":
        # The paper's count for what is stored: a factored cluster at its own rank, a group
        # of matrices kept by their (DCT) entries as m N numbers.
        paper = sum(paper_params(s["rank"], m, s["columns"], 2) if s["stored"] == "factored"
                    else m * s["columns"] for s in stats)
    else:
        paper = sum(paper_params(rank, m, s["columns"], s["size"]) for s in stats)
    return {
        "params": params,
        "K": int(K),
        "m": int(m),
        "clusters": len(stats),
        "singletons": sum(1 for s in stats if s["size"] == 1),
        "compression_ratio": input_numbers / paper if paper else 1.0,
        "stored_ratio": input_numbers / stored_numbers if stored_numbers else 1.0,
        "input_bytes": int(input_numbers * input_itemsize),
        "stored_bytes": int(stored_numbers * stored_itemsize),
        "max_error": max((s["error"] for s in stats), default=0.0),
        "max_matrix_error": _finite(max_matrix_error),
        "guarantee": params.get("guarantee", "cluster"),
        "encoding": params.get("encoding", "plain"),
        "file_bytes": 0,
        "bytes_ratio": 0.0,
        "over_eps": sum(1 for s in stats if s["error"] > eps),
        "eps": float(eps),
        "seconds": round(float(seconds), 3),
        "peak_rss_mb": peak_rss_mb(),
        "cluster_stats": stats,
    }


def render_table(report: dict, console) -> None:
    """A human summary of a report on a rich console."""
    from rich.table import Table

    summary = Table(title="matclust result", show_header=False, title_justify="left")
    summary.add_column("key", style="bold")
    summary.add_column("value", justify="right")
    p = report["params"]
    rows = [
        ("input", f"{p.get('input')}:{p.get('dataset')}"),
        ("method / order", f"{p.get('method')} / {p.get('order')}" if p.get("order")
         else f"{p.get('method')} (baseline, no error control)"),
        ("rank, eps", f"{p.get('rank')}, {p.get('eps')}"),
        ("matrices (K) x rows (m)", f"{report['K']} x {report['m']}"),
        ("clusters", str(report["clusters"])),
        ("singletons", str(report["singletons"])),
        ("compression ratio (paper)", f"{report['compression_ratio']:.3f}"),
        ("stored ratio", f"{report['stored_ratio']:.3f}"),
        ("input / stored bytes", f"{report['input_bytes']:,} / {report['stored_bytes']:,}"),
        ("guarantee / encoding", f"{report.get('guarantee')} / {report.get('encoding')}"),
        ("file bytes (ratio)", f"{report.get('file_bytes', 0):,} ({report.get('bytes_ratio', 0):.2f})"),
        ("max error (cluster / matrix)",
         f"{report['max_error']:.3g} / {report.get('max_matrix_error', 0):.3g}"),
        ("clusters over eps", str(report.get("over_eps", 0))),
        ("seconds", f"{report['seconds']:.2f}"),
        ("peak RSS (MiB)", f"{report['peak_rss_mb']:.0f}"),
    ]
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)
    stats = report["cluster_stats"]
    big = sorted(stats, key=lambda s: -s["size"])[:10]
    if big:
        table = Table(title=f"largest clusters ({len(big)} of {len(stats)})", title_justify="left")
        for col in ("id", "size", "columns", "rank", "bound", "error", "stored"):
            table.add_column(col, justify="right")
        for s in big:
            table.add_row(str(s["id"]), str(s["size"]), str(s["columns"]), str(s["rank"]),
                          f"{s['bound']:.3g}", f"{s['error']:.3g}", s["stored"])
        console.print(table)


