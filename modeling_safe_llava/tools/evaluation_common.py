# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""What evaluation and calibration share: the labelled dataset's checks and columns, batching, and the plots' canvas."""

from pathlib import Path


REQUIRED_COLUMNS = ("image", "conversations", "safe_level", "safe_type")


def check_dataset(dataset, num_levels: int, num_types: int):
    """Raises unless `dataset` (one split, or a list of dicts) has the labelled columns, with valid labels."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"Pass one split of the DatasetDict (one of {list(dataset)}), not the whole DatasetDict.")
    if not isinstance(dataset, (datasets.Dataset, list)):
        raise ValueError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("dataset is empty.")
    columns = dataset.column_names if isinstance(dataset, datasets.Dataset) else list(dataset[0])
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(
            f"dataset lacks the column(s) {missing}; needed: {list(REQUIRED_COLUMNS)} (plus optional id, source)."
        )
    levels, types = column(dataset, "safe_level"), column(dataset, "safe_type")
    for row, (level, type_index) in enumerate(zip(levels, types)):
        level_ok = isinstance(level, int) and 0 <= level < num_levels
        if not (level_ok and isinstance(type_index, int) and 0 <= type_index < num_types):
            raise ValueError(
                f"Row {row} has safe_level={level!r}, safe_type={type_index!r}; accepted: levels 0-{num_levels - 1}, "
                f"types 0-{num_types - 1}."
            )


def column(dataset, name: str) -> list:
    """The values of one column (`None` for each row where it is absent)."""
    if isinstance(dataset, list):
        return [row.get(name) for row in dataset]
    return dataset[name] if name in dataset.column_names else [None] * len(dataset)


def batches(dataset, batch_size: int):
    """`(start index, list of row dicts)`, `batch_size` at a time (the last one may be shorter)."""
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        if isinstance(dataset, list):
            yield start, dataset[start:stop]
        else:
            columns = dataset[start:stop]
            yield start, [{name: values[i] for name, values in columns.items()} for i in range(stop - start)]


def new_figure(width: float, height: float):
    # An explicit Agg canvas: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def finish_flag_rate_plot(figure, axes, path: Path, xlabel: str, ylabel: str, legend_size: int):
    """Axes of a flag-rate-against-threshold plot (both in [0, 1]), legend and grid; saves the PNG to `path`."""
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=legend_size, loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


__all__ = ["REQUIRED_COLUMNS", "batches", "check_dataset", "column", "finish_flag_rate_plot", "new_figure"]
