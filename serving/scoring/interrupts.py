"""SIGINT and SIGTERM during a scoring run: the run stops where it is, writes nothing, and exits 128 + the signal.

`Guard` holds a handler for both signals for the duration of a run (in the main thread, the one where
Python runs signal handlers; elsewhere it does nothing). Once the run is under way (`Guard.arm()`), the
first signal raises `Interrupted`, a KeyboardInterrupt that carries the signal's number, in the main
thread, wherever it is: importing, loading the model, waiting for the server or for a chunk, writing.
The clean-up that Ctrl-C always had then runs for SIGTERM too, whose default action kills the process
on the spot. Every later signal is only noted (`Guard.received` keeps the first), so that the clean-up
itself is never cut short; so is a signal that comes while an exception is being handled (the clean-up
of a failure: the run fails anyway, and the noted signal decides its exit status), and any signal once
the run's outcome is decided (`Guard.settle()`). A noted signal is raised at the next `check()`.

Two kinds of step must not be cut in two, and hold a signal back until they are done:
- `deferred()`: creating the temporary files and registering them, removing them again, stopping the
  pipeline's threads. A signal that came meanwhile is raised when the step ends.
- `committing()`: the renames that put the files in place. A signal that came before them stops the
  run instead (even one whose exception some library swallowed: nothing is committed after a signal).
  Once they are done the run's outcome is decided (`Guard.committed`): a signal during or after them is
  only noted, and the run reports what it did.
When there is no run (no `Guard` in this thread) both are no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: Guard | None = None


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM came: the run stops. `signum` says which; the exit status is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Guard:
    """Handles SIGINT and SIGTERM while a run is in it; see the module's docstring.

    On leaving, the handlers that were there before come back; with `to_exit` (the run is the whole
    program, which ends right after it) both signals are ignored instead, so that one that comes once the
    outcome is decided cannot turn into a death by signal while the interpreter shuts down.
    """

    def __init__(self, *, to_exit: bool = False):
        self.to_exit = to_exit
        self.received: int | None = None  # the first signal's number
        self.committed = False  # the run's files are in place
        self._raised = False  # Interrupted has been raised: the clean-up is under way
        self._settled = False  # the outcome is decided: signals are only noted
        self._depth = 1  # inside deferred() or committing(), or not yet armed
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Guard:
        """Installs the handlers; a signal is only noted until `arm()`."""
        global _active
        if threading.current_thread() is not threading.main_thread() or _active is not None:
            return self  # no handlers here: Python runs them in the main thread only
        _active = self
        # Both at once: a SIGTERM between the two would otherwise still kill the process outright.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS) if hasattr(signal, "pthread_sigmask") else None
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self

    def arm(self) -> None:
        """From now on the first signal raises Interrupted; raises it now if one came already."""
        self._depth -= 1
        self.check()

    def __exit__(self, *exc) -> None:
        global _active
        self._settled = True
        if _active is not self:
            return
        for sig, previous in self._previous.items():
            if self.to_exit:
                signal.signal(sig, signal.SIG_IGN)
            else:
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        _active = None

    def settle(self) -> None:
        """The outcome is decided (the run returned or failed): from now on signals are only noted."""
        self._settled = True

    def interrupt(self, signum: int) -> None:
        """The signal came, caught by another handler: noted, and raised now."""
        if self.received is None:
            self.received = signum
        self._raised = True
        raise Interrupted(signum)

    def reclaim(self) -> None:
        """Installs the handlers again (see the module's `reclaim()`)."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        self.check()

    def check(self) -> None:
        """Raises Interrupted for a signal that was only noted, unless signals are held back now."""
        if self.received is None or self._depth or self._raised or self._settled:
            return
        if sys.exc_info()[1] is not None:
            # The main thread is handling an exception: maybe the clean-up of a failure, which must run to
            # its end (a `with` block's exit, a `finally:`). The failure goes on; the signal stays noted.
            return
        self._raised = True
        raise Interrupted(self.received)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """See the module's `deferred()`."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.check()

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """See the module's `committing()`."""
        if self.received is not None:  # even if its exception was swallowed on the way: no commit after a signal
            self._raised = True
            raise Interrupted(self.received)
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            raise
        self.committed = self._settled = True
        self._depth -= 1


def _current() -> Guard | None:
    # The handlers run in the main thread only: another thread neither holds them back nor raises them.
    return _active if threading.current_thread() is threading.main_thread() else None


def check() -> None:
    """Raises Interrupted now for a signal that came but was only noted (see the module's docstring)."""
    guard = _current()
    if guard is not None:
        guard.check()


def deferred() -> contextlib.AbstractContextManager[None]:
    """Holds signals back while the body runs; one that came meanwhile is raised when it ends.

    If the body raises, its exception goes on (the run fails; a noted signal still decides the exit status).
    """
    guard = _current()
    return contextlib.nullcontext() if guard is None else guard.deferred()


def interrupt(signum: int) -> None:
    """Raises Interrupted for a signal that another handler caught (Ray's, while it starts), as ours would."""
    guard = _current()
    if guard is not None:
        guard.interrupt(signum)
    raise Interrupted(signum)


def reclaim() -> None:
    """Installs the running Guard's handlers again, after a library put its own in their place (Ray's driver
    does, for SIGTERM, in `ray.init`)."""
    guard = _current()
    if guard is not None:
        guard.reclaim()


def committing() -> contextlib.AbstractContextManager[None]:
    """The step that puts a run's files in place: not begun after a signal, not interrupted once begun.

    If the body completes, the run is committed and later signals change nothing; if it raises, its
    exception goes on.
    """
    guard = _current()
    return contextlib.nullcontext() if guard is None else guard.committing()
