"""One log line per decision, Postfix-like text or JSON, on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .replies import Reply
from .session import Envelope, Session

__all__ = ["decision", "configure"]

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


def _text(fields: dict[str, Any]) -> str:
    parts = [f"{fields['session']}: {fields['stage']} {fields['action']}:"]
    parts.append(f"client={fields['client']}")
    parts.append(f"helo=<{fields['helo']}>")
    if "from" in fields:
        parts.append(f"from=<{fields['from']}>")
    if "to" in fields:
        parts.append(f"to=<{fields['to']}>")
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


def configure(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger("smtpgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
