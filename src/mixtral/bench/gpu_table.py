"""What ``mixtral bench gpu`` shows: one table with a column group per scheme, and the tok/s-against-batch plot.

The table is built from the results dict alone (``build_table``: header and rows of strings, testable without a
GPU), then printed with rich or written as Markdown (the form BENCHMARKS.md takes). Per scheme the columns are
the figure, its bound, the fraction of the bound reached and, when the unquantized model ran too, the ratio to
it. Rows: the weights, decode tok/s at each batch (bound: the scheme's memory roofline, per GPU under tensor
parallelism), the prefill (bound: the datasheet peak of the precision its matmuls run in), each offline run's
output tok/s and the share of its steps the device waited for the host, the all-reduce time per decode step
under tensor parallelism, and the peers.

Not here: measuring (bench/gpu_runner.py, gpu_measure.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mixtral.bench.args import PEERS

Row = list[str]


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _times(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def build_table(results: dict[str, Any]) -> tuple[Row, list[Row]]:
    """(header, rows) of the run's table; a scheme that did not fit or failed shows why in its weights row and
    "-" where it has no figure."""
    schemes: dict[str, dict[str, Any]] = results["schemes"]
    base = results.get("baseline")
    with_ratio = {label: base is not None and label != base and base in schemes for label in schemes}
    header = ["figure"]
    for label in schemes:
        header += [label, f"{label} bound", f"{label} of bound"] + ([f"{label} / {base}"] if with_ratio[label] else [])
    rows: list[Row] = []

    def add(name: str, cells: dict[str, tuple[str, str, str, float | None] | None]) -> None:
        row = [name]
        for label in schemes:
            got = cells.get(label)
            value, bound, frac, ratio = got if got is not None else ("-", "-", "-", None)
            row += [value, bound, frac] + ([_times(ratio)] if with_ratio[label] else [])
        rows.append(row)

    ranks = results.get("ranks", 1)
    room = results.get("engine_memory_bytes")
    weights = {}
    for label, res in schemes.items():
        mine = res["weight_bytes"]["total"] / ranks
        status = res.get("status", "ok")
        share = f"{mine / room:.0%}" if room else "-"
        weights[label] = (_bytes(mine), f"of {_bytes(room)}" if room else "-",
                          share if status == "ok" else status, None)
    add("weights" + (" per GPU" if ranks > 1 else ""), weights)

    batches = sorted({r["batch"] for res in schemes.values() for r in res.get("decode", [])})
    for b in batches:
        add(f"decode batch {b} (tok/s)", {
            label: (f"{r['tok_s']:,.1f}", f"{r['roofline_tok_s']:,.1f}", f"{r['fraction']:.0%}", r.get("over_baseline"))
            for label, res in schemes.items() for r in res.get("decode", []) if r["batch"] == b})

    for key, name in (("prefill", "back to back"), ("prefill_rested", "from an idle GPU")):
        cells = {label: (f"{p['tok_s']:,.0f}", f"{p['TFLOPs']:.0f} of {p['peak_TFLOPs']:.0f} TFLOP/s",
                         f"{p['fraction_of_peak']:.1%}", p.get("over_baseline"))
                 for label, res in schemes.items() if (p := res.get(key)) is not None}
        if cells:
            tokens = next(res[key]["tokens"] for res in schemes.values() if key in res)
            add(f"prefill {tokens}, {name} (tok/s)", cells)

    runs = sorted({(r["input_len"], r["output_len"], r["requests"]) for res in schemes.values()
                   for r in res.get("offline", [])})
    for in_len, out_len, n in runs:
        mine = {label: r for label, res in schemes.items() for r in res.get("offline", [])
                if (r["input_len"], r["output_len"], r["requests"]) == (in_len, out_len, n)}
        add(f"offline {n} x {in_len}/{out_len} (output tok/s)", {
            label: (f"{r['output_tok_s']:,.0f}", f"{r['max_running']} running", "", r.get("over_baseline"))
            for label, r in mine.items()})
        add(f"offline {n} x {in_len}/{out_len}: host ms of ms/step", {
            label: (f"{r['host']['host_ms_per_step']:.2f}", f"{r['host']['wall_ms_per_step']:.2f}",
                    f"{r['host']['host_share']:.0%}", None) for label, r in mine.items()})

    for b in batches:
        cells = {label: (f"{r['all_reduce_ms_per_step']:.3f}", "", f"{r['all_reduce_share']:.0%}"
                         if r.get("all_reduce_share") is not None else "-", None)
                 for label, res in schemes.items() for r in res.get("parallel", {}).get("decode", [])
                 if r["batch"] == b}
        if cells:
            add(f"all-reduce ms per decode step, batch {b}", cells)

    for peer in PEERS:
        for b in batches:
            cells = {label: (f"{r['tok_s']:,.1f}" if r["tok_s"] is not None else r.get("error", "-"), "",
                             f"ours {_times(r['ours_over_peer'])}" if r["ours_over_peer"] else "-", None)
                     for label, res in schemes.items() for r in res.get(f"peer_{peer}", []) if r["batch"] == b}
            if cells:
                add(f"peer {peer}, decode batch {b} (tok/s)", cells)
    return header, rows


def title(results: dict[str, Any]) -> str:
    layout = f", {results['parallel_layout']}" if results.get("parallel_layout") else ""
    kv = results.get("kv_cache_dtype", "auto")
    return (f"mixtral bench gpu: {results['model']} ({results['dtype']}{layout}, KV cache {kv}) on "
            f"{results['device']}, commit {results.get('commit', '?')}")


def notes(results: dict[str, Any]) -> list[str]:
    """One line per scheme that was not measured (or not fully), with why."""
    return [f"{label}: {res['status']}: {res.get('error', '')}" for label, res in results["schemes"].items()
            if res.get("status", "ok") != "ok"]


def to_markdown(header: Row, rows: list[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    """The table with rich; wide enough for every column when the output is a file (rich wraps at 80 there)."""
    from rich.console import Console
    from rich.table import Table

    header, rows = build_table(results)
    table = Table(title=title(results))
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    width = sum(max(len(c) for c in col) + 3 for col in zip(header, *rows, strict=True)) + 1
    console = Console() if sys.stdout.isatty() else Console(width=max(width, 80))
    console.print(table)
    for line in notes(results):
        console.print(line, markup=False)


def plot_decode(results: dict[str, Any], path: Path) -> list[str]:
    """tok/s against batch size, one line per scheme beside its roofline (dashed, same colour), and the peers
    (log-log). Returns the lines' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, res) in enumerate(results["schemes"].items()):
        rows = res.get("decode", [])
        if not rows:
            continue
        color = f"C{i}"
        b = [r["batch"] for r in rows]
        ax.plot(b, [r["roofline_tok_s"] for r in rows], "--", color=color, alpha=0.7, label=f"{label} roofline")
        ax.plot(b, [r["tok_s"] for r in rows], "o-", color=color, label=f"mixtral {label}")
        for key, marker in zip(PEERS, "s^", strict=True):
            peer = [r for r in res.get(f"peer_{key}", []) if r["tok_s"] is not None]
            if peer:
                ax.plot([r["batch"] for r in peer], [r["tok_s"] for r in peer], marker + ":", color="gray",
                        label=PEERS[key])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("output tokens / s" + (" (per GPU roofline)" if results.get("parallel_layout") else ""))
    ax.set_title(f"{results['model']} decode, {results['device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    labels = [str(line.get_label()) for line in ax.get_lines()]
    plt.close(fig)
    return labels
