"""One log line per decision, Postfix-like text or JSON, on stderr.

Lines are written by a thread of their own (:class:`LineWriter`), never by
the event loop: a stderr that is read slowly (journald rate-limiting, a
full pipe to a log shipper) must not stall every session of a worker, as
a blocking ``write`` there would.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import select
import signal
import sys
import threading
import time
import weakref
from typing import Any

from .replies import Reply
from .session import Envelope, Session

__all__ = ["decision", "configure", "flush", "LineWriter"]

_decisions = logging.getLogger("smtpgate.decision")


def decision(
    session: Session,
    stage: str,
    action: str,
    reply: Reply | None,
    *,
    envelope: Envelope | None = None,
    rcpt: str | None = None,
    plugin: str = "",
    result: str = "",
    level: int = logging.INFO,
) -> None:
    """Log what was decided for one command, with everything needed to find
    the mail in the next hop's log too (Postfix's own ``client=`` form)."""
    if not _decisions.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "session": session.id,
        "stage": stage,
        "action": action,
        "client": session.client,
        "helo": session.helo or "",
    }
    if envelope is not None:
        fields["from"] = envelope.sender.mailbox
        fields["txn"] = envelope.id
    if rcpt is not None:
        fields["to"] = rcpt
    if plugin:
        fields["plugin"] = plugin
    if result:
        fields["result"] = result
    if reply is not None:
        fields["reply"] = str(reply)
    # Logger.log would first walk the stack to name the caller, which is
    # always this function: a sixth of what a decision line costs, and no
    # formatter here shows it.  The line is the message itself, with no
    # arguments: nothing left for getMessage to %-format.
    record = _decisions.makeRecord(
        _decisions.name, level, "(unknown file)", 0, _text(fields), (), None, extra={"fields": fields}
    )
    _decisions.handle(record)


#: What could end a ``<...>`` field or start another inside it.
_UNSAFE_IN_BRACKETS = re.compile(r"[\s<>\\]")
_BRACKET_ESCAPES = str.maketrans({"\\": "\\\\", "<": "\\x3c", ">": "\\x3e", " ": "\\x20", "\t": "\\x09"})


def _bracketed(text: str) -> str:
    """``text`` for inside ``<...>``: a quoted local part may hold
    ``> to=<ceo@example.com``, which a log parser would read as fields of
    their own; spaces, brackets and backslashes are written as escapes, so
    the field stays one word that ends at its own ``>``."""
    if _UNSAFE_IN_BRACKETS.search(text) is None:
        return text
    escaped = text.translate(_BRACKET_ESCAPES)
    # Other white space (a rare UTF-8 one in a quoted local part) too.
    return re.sub(r"\s", lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", escaped)


def _text(fields: dict[str, Any]) -> str:
    parts = [f"{fields['session']}: {fields['stage']} {fields['action']}:"]
    parts.append(f"client={fields['client']}")
    parts.append(f"helo=<{_bracketed(fields['helo'])}>")
    if "from" in fields:
        parts.append(f"from=<{_bracketed(fields['from'])}>")
    if "to" in fields:
        parts.append(f"to=<{_bracketed(fields['to'])}>")
    for key in ("plugin", "result"):
        if key in fields:
            parts.append(f"{key}={fields[key]}")
    if "reply" in fields:
        # Quoted as a whole: a list's TXT text in it could otherwise end
        # the quotes and pass for fields of its own (action=accept ...).
        reply = fields["reply"].replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'reply="{reply}"')
    return " ".join(parts)


class TextFormatter(logging.Formatter):
    """``TIME smtpgate[PID] LEVEL MESSAGE``: what the format string
    ``%(asctime)s smtpgate[%(process)d] %(levelname)s %(message)s`` gives,
    made with less work, for every message writes a line."""

    FORMAT = "%(asctime)s smtpgate[%(process)d] %(levelname)s %(message)s"

    def __init__(self) -> None:
        super().__init__(self.FORMAT)
        self._stamp = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        # The lines of one second share its date and time: strftime of the
        # local time once a second, not once a line.  One tuple, so a
        # thread's line never pairs one second with another's text.
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._stamp = stamp
        msec_format = self.default_msec_format
        return msec_format % (stamp[1], record.msecs) if msec_format else stamp[1]

    def format(self, record: logging.LogRecord) -> str:
        # One f-string for the format string above: logging's generic way
        # (searching the format for asctime, % over the record's __dict__)
        # costs more than the line itself.
        record.message = record.getMessage()
        line = f"{self.formatTime(record)} smtpgate[{record.process:d}] {record.levelname} {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            if line[-1:] != "\n":
                line += "\n"
            line += record.exc_text
        if record.stack_info:
            if line[-1:] != "\n":
                line += "\n"
            line += self.formatStack(record.stack_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


#: Seconds the writer lets lines gather before it writes them.
_GATHER = 0.02


class LineWriter(logging.Handler):
    """Formats a record where it is logged, and leaves the writing to a
    thread, so the caller never waits for the reader of ``fd``.

    At most ``max_pending`` lines wait; past that, new lines are dropped
    and counted, and a warning says how many once the reader catches up:
    a log that cannot keep up must cost lines, not mail.  The thread
    starts with the first line in each process, as a forked worker
    inherits no thread, and the lines its parent had not written yet are
    the parent's to write.
    """

    def __init__(self, fd: int = 2, *, max_pending: int = 10_000) -> None:
        super().__init__()
        self.fd = fd
        self.max_pending = max_pending
        self._fresh()
        _WRITERS.add(self)

    def _fresh(self) -> None:
        self._lines: collections.deque[str | threading.Event] = collections.deque()
        self._wake = threading.Event()
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
        # Two counts, each with one writer (the loggers, the thread), so
        # neither needs a lock.
        self._dropped = 0
        self._reported = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - as StreamHandler: reported, never raised into the caller
            self.handleError(record)
            return
        if len(self._lines) >= self.max_pending:
            self._dropped += 1
            return
        self._put(line)

    def _put(self, item: str | threading.Event) -> None:
        self._lines.append(item)
        if self._thread is None:
            with self._starting:
                if self._thread is None:
                    self._thread = self._start()
        if not self._wake.is_set():
            self._wake.set()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="smtpgate-log", daemon=True)
        # The thread is born with every signal blocked (a thread inherits
        # its creator's mask): the supervisor takes SIGCHLD, SIGTERM, SIGHUP
        # and SIGIO with sigtimedwait while they are blocked in its own
        # thread, and the kernel gives a process's signal to any thread
        # that does not block it -- where it would be lost, or end the
        # process by its default action.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return thread

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the lines logged so far are written, at most
        ``timeout`` seconds (a reader that never reads cannot hold an
        exit forever)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return
        written = threading.Event()
        self._put(written)
        written.wait(timeout)

    def _run(self) -> None:
        lines, wake = self._lines, self._wake
        while True:
            wake.wait()
            # Lines come in bursts (a session's commands): letting them
            # gather for a moment makes one wake-up and one write of many,
            # where each would otherwise cost its own.
            time.sleep(_GATHER)
            wake.clear()
            batch: list[str] = []
            while lines:
                item = lines.popleft()
                if isinstance(item, str):
                    batch.append(item)
                    if len(batch) < 256:
                        continue
                self._write(batch)
                batch = []
                if isinstance(item, threading.Event):
                    self._report_dropped()  # before a flush returns: an exit must not lose it
                    item.set()
            self._write(batch)
            self._report_dropped()

    def _report_dropped(self) -> None:
        dropped = self._dropped - self._reported
        if dropped:
            self._reported += dropped
            self._write([self.format(logging.LogRecord(
                "smtpgate.log", logging.WARNING, __file__, 0,
                "%d log lines dropped: more than %d were waiting for stderr to be read",
                (dropped, self.max_pending), None,
            )) + "\n"])

    def _write(self, batch: list[str]) -> None:
        if not batch:
            return
        data = memoryview("".join(batch).encode("utf-8", "backslashreplace"))
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                # A stderr someone made non-blocking (it is shared with the
                # parent and whatever started us): wait for room, as a
                # blocking write would, rather than lose the batch.
                select.select([], [self.fd], [], 1.0)
            except OSError:
                return  # stderr closed or gone: nowhere left to say so


_WRITERS: weakref.WeakSet[LineWriter] = weakref.WeakSet()


def _after_fork() -> None:
    for writer in list(_WRITERS):
        writer._fresh()


os.register_at_fork(after_in_child=_after_fork)


def _writer() -> LineWriter | None:
    return next((h for h in logging.getLogger("smtpgate").handlers if isinstance(h, LineWriter)), None)


def flush() -> None:
    """Write out what was logged so far: before a worker's ``os._exit``,
    which skips logging's own shutdown, and before a line printed to
    stderr directly, so it comes after them."""
    writer = _writer()
    if writer is not None:
        writer.flush()


def configure(fmt: str = "text", level: str = "info") -> None:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stderr (io.UnsupportedOperation is an OSError)
        fd = 2
    handler = LineWriter(fd)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger("smtpgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
