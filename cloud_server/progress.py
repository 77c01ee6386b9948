"""The progress display of `sfprompt-cloud serve`: a bar over rounds with the latest accuracy."""

from __future__ import annotations

from .metrics import RoundMetrics


class RoundProgress:
    """A rich progress bar over rounds showing the latest accuracy (quiet when disabled)."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            disable=not enabled,
        )
        self.task = self.progress.add_task("waiting for devices", total=rounds)

    def resumed(self, done: int) -> None:
        self.progress.update(self.task, completed=done, description=f"resumed after {done}")

    def update(self, m: RoundMetrics) -> None:
        acc = "" if m.accuracy is None else f"accuracy {m.accuracy:.3f} "
        text = (
            f"{acc}round {m.round}: {len(m.accepted)}/{len(m.selected)} devices, {m.seconds:.1f}s"
        )
        self.progress.update(self.task, completed=m.round, description=text)

    def __enter__(self) -> RoundProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]
