"""Progress of long tasks: a terminal bar where a person watches, plain log lines elsewhere."""

from __future__ import annotations

import os
import sys

from prefect import get_run_logger


def interactive() -> bool:
    """True on a terminal outside CI: show progress bars; else plain log lines."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stderr.isatty()


class ProgressBar:
    """A terminal progress bar (tqdm: count, rate, ETA) fed with (done, total); it closes
    itself when done reaches total."""

    def __init__(self, what: str, unit: str = "img", position: int | None = None):
        self.what, self.unit, self.position = what, unit, position
        self.bar = None

    def __call__(self, done: int, total: int, **postfix) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=self.what,
                unit=self.unit,
                position=self.position,
                dynamic_ncols=True,
                leave=True,
                file=sys.stderr,
            )
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(what: str, unit: str = "img", position: int | None = None) -> ProgressBar | None:
    """A ProgressBar when attached to a terminal (and tqdm is there), else None."""
    if not interactive():
        return None
    try:
        import tqdm  # noqa: F401  (comes with timm's huggingface_hub)
    except ImportError:
        return None
    return ProgressBar(what, unit, position)


def log_progress(what: str, every: int = 10):
    """A progress callback (done, total): a bar with rate and ETA on a terminal, else a log
    line every ``every`` percent (CI, workers, anything not a TTY)."""
    bar = progress_bar(what)
    if bar is not None:
        return bar
    logger = get_run_logger()
    last = [-1]

    def cb(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // every > last[0] or done == total:
            last[0] = pct // every
            logger.info("%s: %d/%d (%d%%)", what, done, total, pct)

    return cb
