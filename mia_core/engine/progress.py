"""Progress and messages of long work: one base, a silent default and a terminal implementation.

Stages report through a :class:`Reporter`; the engine's default is silent (notebooks and sweeps
stay quiet), the CLI passes a :class:`TerminalReporter` that draws tqdm bars on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, ContextManager, Iterator

Update = Callable[..., None]


class Reporter:
    """Where stages send progress. The base class reports nothing.

    ``progress(total, desc)`` is a context manager yielding ``update(n=1, **postfix)``;
    ``message(text)`` reports one line.
    """

    def message(self, text: str) -> None:
        """Report one line of text (e.g. "loaded 16 trained models from the cache")."""

    def progress(self, total: int, desc: str) -> ContextManager[Update]:
        """A context manager around ``total`` units of work described by ``desc``; it yields
        ``update(n=1, **postfix)`` (postfix values are numbers shown beside the bar)."""
        return _noop()


@contextlib.contextmanager
def _noop() -> Iterator[Update]:
    yield lambda n=1, **postfix: None


class TerminalReporter(Reporter):
    """tqdm bars and one-line messages on stderr; ``quiet=True`` silences both."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def progress(self, total: int, desc: str) -> ContextManager[Update]:
        if self.quiet:
            return _noop()
        return self._bar(total, desc)

    @contextlib.contextmanager
    def _bar(self, total: int, desc: str) -> Iterator[Update]:
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.5) as t:
            def update(n=1, **postfix):
                if postfix:
                    t.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
                t.update(n)

            yield update
        self.message(f"{desc}: done")


__all__ = ["Reporter", "TerminalReporter"]
