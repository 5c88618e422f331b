"""The Fashion-MNIST lab: `clipdistill demo` (the lab end to end) and `clipdistill bench` (the grid over
seeds), their rows, and what the benchmark scripts reuse of them.

`LAB_CONFIG` is the lab's config file; `demo` and `bench` start from it unless given another.
"""

from pathlib import Path

from clipdistill.lab.bench import (
    ALIASES,
    ALL_ROWS,
    GROUPS,
    bench_overrides,
    run_bench,
    select_rows,
    write_plots,
)
from clipdistill.lab.demo import (
    METRICS,
    ROWS,
    evaluated,
    format_table,
    row_config,
    run_demo,
    run_rows,
    summarize,
    train_teacher,
    val_zeroshot,
)

LAB_CONFIG = Path(__file__).parent / "lab.yaml"

__all__ = [
    "ALIASES",
    "ALL_ROWS",
    "GROUPS",
    "LAB_CONFIG",
    "METRICS",
    "ROWS",
    "bench_overrides",
    "evaluated",
    "format_table",
    "row_config",
    "run_bench",
    "run_demo",
    "run_rows",
    "select_rows",
    "summarize",
    "train_teacher",
    "val_zeroshot",
    "write_plots",
]
