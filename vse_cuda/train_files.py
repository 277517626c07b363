"""The run directory's files: their names, the per-epoch CSV log, the loss and dev-rsum plot,
the test table, and the checks of a run dir and of a checkpoint's configuration. Every file is
written through :func:`vse_cuda._checkpoint.atomic_write`, so a killed run leaves each one whole.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ._checkpoint import CheckpointError, atomic_write, output_dir_problem
from .evaluate import METRICS
from .train_config import RESUMABLE_CHANGES, ConfigError

CHECKPOINT, BEST, LOG, PLOT, RESULTS = "checkpoint.pt", "model_best.pt", "log.csv", "curves.png", "results.md"
CANDIDATES = "aoq_candidates.pt"
#: Every file the harness writes into the run dir (all through atomic_write).
RUN_FILES = (CHECKPOINT, BEST, LOG, PLOT, RESULTS, CANDIDATES)
LOG_FIELDS = ("round", "epoch", "loss", "lr", "train_loss", "steps", "seconds", "ms_per_step", "peak_rss_mib",
              *(f"dev_{m}" for m in METRICS))


def check_run_dir(run_dir: Path) -> None:
    """``--run-dir`` must be (or become) a writable directory whose file names are free for the
    run's files; checked before any data is loaded or anything written (ConfigError otherwise)."""
    problem = output_dir_problem(run_dir, RUN_FILES)
    if problem:
        raise ConfigError(f"--run-dir {run_dir}: {problem}")


def check_same_config(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """The Config a checkpoint at ``path`` was ``saved`` with must equal ``current`` but for
    ``RESUMABLE_CHANGES`` (CheckpointError naming every difference otherwise)."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in current
            if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if diff:
        raise CheckpointError(f"{path} was written by another configuration; resume with the same options "
                              f"({'; '.join(diff)})")


def write_log(history: list[dict[str, Any]], path: Path) -> None:
    """The per-epoch CSV, rewritten whole from the checkpointed history (a resumed run's log
    has no duplicate or missing rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def write_plot(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and dev rsum per epoch, rounds side by side on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(history) + 1))
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean training loss per step", yscale="log", title="loss")
    ax_rsum.plot(x, [r["dev_rsum"] for r in history], marker="o", color="tab:green")
    ax_rsum.set(xlabel="epoch", ylabel="rsum (dev)", title="dev rsum (max 600)")
    switches = [i + 0.5 for i in range(1, len(history)) if history[i]["loss"] != history[i - 1]["loss"]]
    for ax in (ax_loss, ax_rsum):
        for i, x_switch in enumerate(switches):  # warm-up end, AOQ round two
            ax.axvline(x_switch, color="grey", linestyle=":", label="loss changes" if i == 0 else None)
        if switches:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_results(path: Path, header: str, table: str) -> None:
    """The final test table (``results.md``): a header line, then the markdown table."""
    atomic_write(path, lambda tmp: tmp.write_text(f"{header}\n\n{table}\n"))
