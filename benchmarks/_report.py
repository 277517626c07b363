"""What every bench_*.py writes and parses alike: number formatting, the CSV, markdown tables,
matplotlib figures, the common command-line arguments and the start and end of a run.

A benchmark keeps its own columns, tables and plots (what it measures); this module keeps
how they are written, so that a results file of one benchmark reads like another's.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

#: Where a benchmark writes unless --out-dir says otherwise (checked in: runs of record only).
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------- numbers

def fmt(value: float | None, spec: str) -> str:
    """`value` in format `spec`, "-" for a value that was not measured."""
    return "-" if value is None else format(value, spec)


def div(a: float | None, b: float | None) -> float | None:
    """a ÷ b, None where either is missing or b is 0."""
    return None if a is None or not b else a / b


def pct(fraction: float | None) -> str:
    """A fraction as a percentage with two decimals, "-" where it was not measured."""
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def status_cell(row: dict[str, Any]) -> str:
    """"ok", or the status with the detail that says why not."""
    return row["status"] if row["status"] == "ok" else f"{row['status']}: {row['detail']}"


# ------------------------------------------------------------------------------- files

def write_csv(path: Path, fields: list[str], rows: Iterable[dict[str, Any]], *,
              joined: dict[str, str] | None = None, constant: dict[str, Any] | None = None) -> None:
    """One line per row: the `constant` columns (the same on every line), then `fields`. A
    column in `joined` holds a list, written as its items in that format separated by spaces;
    a field a row lacks is left empty."""
    constant, joined = constant or {}, joined or {}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*constant, *fields], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = {**row, **constant}
            for key, spec in joined.items():
                out[key] = " ".join(format(value, spec) for value in row[key])
            writer.writerow(out)


def heading(title: str, command: str) -> list[str]:
    """The first lines of a report: its title and the command that wrote it."""
    return [f"# {title}", "", f"Command: `{command}`", ""]


def run_line(rows: list[dict[str, Any]], started: datetime.datetime, loads: tuple, finished: bool,
             own_load: str) -> str:
    """A report's line on its run: the start, the minutes taken (INCOMPLETE while unfinished) and
    the 1-min load average at the start, before the rows' cases and at the end; `own_load` says
    how much of that load the benchmark adds itself."""
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    case_loads = [r["load_before"] for r in rows if r["load_before"] is not None]
    return (f"Date: {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min"
            + ("" if finished else " so far (INCOMPLETE: the run was interrupted or is still going)") + ". "
            f"Load (1-min average): {loads[0]:.2f} at the start"
            + (f", {min(case_loads):.1f}–{max(case_loads):.1f} before the cases" if case_loads else "")
            + (f", {loads[1]:.2f} at the end" if len(loads) > 1 else "") + f" ({own_load}).")


def table_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table(header: list[str], align: str, rows: Iterable[Iterable[Any]] = ()) -> list[str]:
    """Markdown lines of a table: `align` has a letter per column, "l" (left) or "r" (right)."""
    assert len(align) == len(header), (align, header)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [table_row(header), rule, *(table_row(cells) for cells in rows)]


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None where matplotlib is
    missing: a benchmark then writes its CSV and markdown without the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def log_log(ax, xlabel: str, ylabel: str | None = None, title: str | None = None) -> None:
    """A panel against N: log2 x axis, log y axis, labels and a grid at every decade."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, path: Path, dpi: int) -> bool:
    """Writes and closes `fig`; True, for a benchmark's write_plot to return."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------- runs

def new_parser(doc: str, *, show_defaults: bool = True) -> argparse.ArgumentParser:
    """The parser of a benchmark whose module docstring is `doc` (its first paragraph is the
    description)."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=(
        argparse.ArgumentDefaultsHelpFormatter if show_defaults else argparse.HelpFormatter))


def add_common_arguments(parser: argparse.ArgumentParser, *, stem: str, defaults: dict[str, Any],
                         quick: dict[str, Any], unit: str = "calls", warmup: int | None = 1,
                         threads: tuple[int, str] | None = None, timeout: float | None = None,
                         seed: bool = True, out_dir: Path | None = RESULTS) -> None:
    """--repeats and --warmup (measured and unmeasured `unit` per case; a warmup of None comes
    from the profile), --threads (`threads` = its default and what it sets), --timeout (its
    default, where cases run in other processes), --seed (the data seed), --out-dir (where
    stem.csv / .md / .png go; None: it must be given) and --quick (the profile `quick` instead
    of `defaults`). parse_profile fills what was not given."""
    parser.add_argument("--repeats", type=int,
                        help=f"measured {unit} per case (default {defaults['repeats']}, --quick {quick['repeats']})")
    if warmup is None:
        parser.add_argument("--warmup", type=int, help=f"unmeasured {unit} before them (default "
                                                       f"{defaults['warmup']}, --quick {quick['warmup']})")
    else:
        parser.add_argument("--warmup", type=int, default=warmup, help=f"unmeasured {unit} before them")
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads[0], help=f"threads for {threads[1]}")
    if timeout is not None:
        parser.add_argument("--timeout", type=float, default=timeout, help="wall-clock limit of one case (s)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--out-dir", type=Path, default=out_dir, required=out_dir is None,
                        help=f"where {stem}.csv / {stem}.md / {stem}.png go")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes for a smoke test ({quick}); explicit flags still win")


def parse_profile(parser: argparse.ArgumentParser, argv: list[str] | None, defaults: dict[str, Any],
                  quick: dict[str, Any]) -> argparse.Namespace:
    """Parses `argv`; every option left unset takes its value from the profile (`quick` with
    --quick, else `defaults`); refuses fewer than 1 repeat or thread, negative warm-ups and
    timeouts that are not positive."""
    args = parser.parse_args(argv)
    for name, value in (quick if args.quick else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.warmup < 0 or getattr(args, "threads", 1) < 1 or getattr(args, "timeout", 1) <= 0:
        parser.error("need --repeats >= 1, --warmup >= 0" + (", --threads >= 1" if hasattr(args, "threads") else "")
                     + (", --timeout > 0" if hasattr(args, "timeout") else ""))
    return args


def start_run(args: argparse.Namespace, argv: list[str] | None, name: str) -> tuple[str, str]:
    """The command line as typed (for the report) and the stem of the output files (`name`,
    `name_quick` with --quick); creates --out-dir."""
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return command, f"{name}_quick" if args.quick else name


def run_saving_each(configs: Iterable[Any], run: Callable[[Any], None], save: Callable[[tuple, bool], None],
                    start_load: float) -> None:
    """Runs every configuration and saves the reports after each, so that a run cut short keeps
    what it measured; `save(loads, finished)` gets the 1-minute load at the start and, on the
    last call (also after an error or an interrupt), at the end."""
    finished = False
    try:
        for cfg in configs:
            run(cfg)
            save((start_load,), False)
        finished = True
    finally:
        save((start_load, os.getloadavg()[0]), finished)


def print_written(tag: str, out_dir: Path, stem: str, plotted: bool, after: str = "") -> None:
    """Prints the markdown report, then which files the run wrote where."""
    print((out_dir / f"{stem}.md").read_text())
    print(f"[{tag}] wrote {stem}.csv, {stem}.md{', ' + stem + '.png' if plotted else ''} in {out_dir}{after}")
