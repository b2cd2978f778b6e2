"""The progress bar that dat's long jobs share."""

from __future__ import annotations


def progress_bar(enabled: bool = True):
    """A rich progress bar: description, bar, count, elapsed, remaining, free-form info."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    disable=not enabled)
