"""One line per decision: Postfix-like text, or JSON for log pipelines."""

import ipaddress
import json
import logging
from pathlib import Path

from gateway import log
from gateway.address import Address
from gateway.replies import Reply
from gateway.session import Envelope, Session

REPLY = Reply(554, "5.7.1", "<x@remote.example>: Relay access denied")


def session() -> Session:
    return Session(client_ip=ipaddress.ip_address("203.0.113.7"), helo="mx.example.org")


def test_text_line_carries_what_finds_the_mail_in_postfixs_log(caplog) -> None:
    s = session()
    envelope = Envelope(Address("bob", "example.org"), ())
    with caplog.at_level(logging.INFO, "smtpgate.decision"):
        log.decision(s, "rcpt", "reject", REPLY, envelope=envelope, rcpt="x@remote.example",
                     plugin="relay", result="relay=denied remote")
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{s.id}: rcpt reject: client=unknown[203.0.113.7] helo=<mx.example.org> from=<bob@example.org> "
        'to=<x@remote.example> plugin=relay result=relay=denied remote '
        'reply="554 5.7.1 <x@remote.example>: Relay access denied"'
    )


def test_json_has_the_same_fields() -> None:
    s = session()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("smtpgate.decision")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        log.decision(s, "connect", "defer", Reply(421, "4.7.0", "busy"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    out = json.loads(log.JSONFormatter().format(records[0]))
    assert {k: out[k] for k in ("level", "logger", "session", "stage", "action", "client", "helo", "reply")} == {
        "level": "info", "logger": "smtpgate.decision", "session": s.id, "stage": "connect", "action": "defer",
        "client": "unknown[203.0.113.7]", "helo": "mx.example.org", "reply": "421 4.7.0 busy",
    }
    assert out["time"].endswith("Z")


def test_nothing_is_formatted_when_the_level_is_off(caplog) -> None:
    with caplog.at_level(logging.WARNING, "smtpgate.decision"):
        log.decision(session(), "data", "delivered", Reply(250, "2.0.0", "Ok"))
    assert caplog.records == []


def test_a_reply_quoting_outside_text_cannot_end_its_quotes(caplog) -> None:
    # A DNS list's TXT record is quoted in the reply; in the line it must
    # stay inside reply="...", or a log parser reads forged fields.
    forged = Reply(554, "5.7.1", 'blocked; see " action=accept to=<ceo@example.com> x="')
    with caplog.at_level(logging.INFO, "smtpgate.decision"):
        log.decision(session(), "rcpt", "reject", forged)
    (record,) = caplog.records
    assert record.getMessage().endswith(
        'reply="554 5.7.1 blocked; see \\" action=accept to=<ceo@example.com> x=\\""')


def test_every_module_logs_where_serve_sends_its_log() -> None:
    # configure() gives "smtpgate" its handler and --log-level; a logger
    # outside it (say "gateway.dns") is never shown, not even at debug.
    import importlib
    import pkgutil

    import gateway

    for info in pkgutil.iter_modules(gateway.__path__):
        if info.name.startswith("_"):
            continue
        module_log = getattr(importlib.import_module(f"gateway.{info.name}"), "log", None)
        if isinstance(module_log, logging.Logger):
            assert module_log.name.startswith("smtpgate."), f"gateway.{info.name} logs to {module_log.name}"


def _record(created: float, exc_info=None, sinfo=None) -> logging.LogRecord:
    record = logging.LogRecord("smtpgate.server", logging.WARNING, __file__, 1, "a %s line", ("warning",), exc_info,
                               sinfo=sinfo)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_text_lines_are_those_of_the_format_string() -> None:
    # TextFormatter makes by hand what logging.Formatter makes of its
    # format string; serve's lines must not change with it.
    plain = logging.Formatter(log.TextFormatter.FORMAT)
    ours = log.TextFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    records = [
        _record(1_780_000_000.25),
        _record(1_780_000_000.999),  # the same second, another record
        _record(1_780_000_001.0),  # the next second
        _record(1_780_000_000.5),  # back (the clock was set back)
        _record(1_780_000_002.007, exc_info=exc_info),
        _record(1_780_000_002.5, sinfo="Stack (most recent call last):\n  here"),
    ]
    for record in records:
        assert ours.format(record) == plain.format(record)
    # A second formatting (exc_text kept from the first) is the same too.
    assert ours.format(records[4]) == plain.format(records[4])
    assert ours.formatTime(records[0], "%H:%M") == plain.formatTime(records[0], "%H:%M")


def test_serve_logs_with_the_text_formatter() -> None:
    root = logging.getLogger("smtpgate")
    saved = root.handlers[:], root.level, root.propagate
    try:
        log.configure("text", "info")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, log.TextFormatter)
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_a_percent_sign_in_a_reply_is_logged_as_it_is(caplog) -> None:
    # The line is the record's message itself (no arguments): a % in it
    # is never taken for a format.
    with caplog.at_level(logging.INFO, "smtpgate.decision"):
        log.decision(session(), "data", "upstream", Reply(452, "4.3.1", "disk 100%s full %(x)s"))
    (record,) = caplog.records
    assert record.getMessage().endswith('reply="452 4.3.1 disk 100%s full %(x)s"')
    assert log.TextFormatter().format(record).endswith('reply="452 4.3.1 disk 100%s full %(x)s"')


def _line(text: str) -> logging.LogRecord:
    return logging.LogRecord("smtpgate.test", logging.INFO, __file__, 1, text, (), None)


def _read_all(fd: int) -> str:
    import os

    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_lines_past_the_limit_are_dropped_and_counted_never_waited_for() -> None:
    import os
    import threading
    import time

    reader, writer_fd = os.pipe()
    os.set_blocking(writer_fd, True)
    try:
        writer = log.LineWriter(writer_fd, max_pending=50)
        writer.setFormatter(logging.Formatter("%(message)s"))


        def log_them() -> None:
            for n in range(5000):  # ~70 KiB: more than the pipe takes
                writer.emit(_line(f"line {n:04d} " + "x" * 4))

        logger = threading.Thread(target=log_them, daemon=True)
        logger.start()
        # Every emit comes back at once, though nothing reads the pipe yet.
        logger.join(5)
        assert not logger.is_alive()
        text = ""
        deadline = time.monotonic() + 10
        while "log lines dropped" not in text and time.monotonic() < deadline:
            text += _read_all(reader)
            time.sleep(0.01)
        writer.flush()
        text += _read_all(reader)
    finally:
        os.close(reader)
        os.close(writer_fd)
    lines = text.splitlines()
    kept = [line for line in lines if line.startswith("line ")]
    warnings = [line for line in lines if "dropped" in line]
    counts = [int(warning.split()[0]) for warning in warnings]
    assert warnings == [f"{n} log lines dropped: more than 50 were waiting for stderr to be read" for n in counts]
    assert len(kept) + sum(counts) == 5000
    assert counts and all(counts)
    # What was kept is in order, and the first lines were kept.
    assert kept == sorted(kept) and kept[0] == "line 0000 xxxx"


def test_flush_returns_once_everything_logged_is_written() -> None:
    import os

    reader, writer_fd = os.pipe()
    try:
        writer = log.LineWriter(writer_fd)
        writer.setFormatter(log.TextFormatter())
        for n in range(100):
            writer.emit(_line(f"line {n}"))
        writer.flush()
        text = _read_all(reader)
    finally:
        os.close(reader)
        os.close(writer_fd)
    assert [line.rsplit(" ", 1)[-1] for line in text.splitlines()] == [str(n) for n in range(100)]


def test_a_forked_child_writes_its_own_lines_not_its_parents() -> None:
    import os

    reader, writer_fd = os.pipe()
    try:
        writer = log.LineWriter(writer_fd)
        writer.setFormatter(logging.Formatter("%(process)d %(message)s"))
        writer.emit(_line("parent before"))
        writer.flush()
        pid = os.fork()
        if pid == 0:  # the child: its own thread, none of the parent's lines
            writer.emit(_line("child"))
            writer.flush()
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        writer.emit(_line("parent after"))
        writer.flush()
        text = _read_all(reader)
    finally:
        os.close(reader)
        os.close(writer_fd)
    assert sorted(line.split(" ", 1)[1] for line in text.splitlines()) == ["child", "parent after", "parent before"]
    assert f"{pid} child" in text


def test_the_writer_thread_blocks_every_signal() -> None:
    # The supervisor takes its signals with sigtimedwait while they are
    # blocked; the kernel gives a process's signal to any thread that does
    # not block it, so the writer thread must block them all, whatever the
    # mask of the thread that started it.
    import os
    import signal

    reader, writer_fd = os.pipe()
    try:
        writer = log.LineWriter(writer_fd)
        writer.emit(_line("start the thread"))
        writer.flush()
        status = Path(f"/proc/self/task/{writer._thread.native_id}/status").read_text()
    finally:
        os.close(reader)
        os.close(writer_fd)
    blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGIO):
        assert blocked & (1 << (sig - 1)), sig.name
    # The thread that started it keeps its own mask.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_a_non_blocking_stderr_loses_no_line() -> None:
    # stderr is shared with whatever started us, which may have made it
    # non-blocking; a full pipe then answers EAGAIN, which is "wait", not
    # "gone".
    import os
    import threading
    import time

    reader, writer_fd = os.pipe()
    os.set_blocking(writer_fd, False)
    received = bytearray()
    try:
        writer = log.LineWriter(writer_fd)
        writer.setFormatter(logging.Formatter("%(message)s"))
        for n in range(3000):  # ~90 KiB: more than the pipe holds
            writer.emit(_line(f"line {n:05d} " + "x" * 16))

        def read_later() -> None:
            time.sleep(0.3)  # the pipe is full by now
            deadline = time.monotonic() + 10
            while received.count(b"\n") < 3000 and time.monotonic() < deadline:
                received.extend(os.read(reader, 65536))

        thread = threading.Thread(target=read_later, daemon=True)
        thread.start()
        writer.flush(timeout=10)
        thread.join(10)
    finally:
        os.close(reader)
        os.close(writer_fd)
    lines = received.decode().splitlines()
    assert lines == [f"line {n:05d} " + "x" * 16 for n in range(3000)]


def test_an_address_cannot_write_fields_of_its_own_into_the_text_line(caplog) -> None:
    # A quoted local part may hold spaces and brackets; in the line they
    # are escapes, so from=<...> stays one word ending at its own ">".
    forged = '"x> plugin=relay result=ok to=<ceo@example.com"@example.org'
    envelope = Envelope(Address('"x> plugin=relay result=ok to=<ceo@example.com"', "example.org"), ())
    with caplog.at_level(logging.INFO, "smtpgate.decision"):
        log.decision(session(), "rcpt", "reject", REPLY, envelope=envelope, rcpt="x@remote.example",
                     plugin="dnsbl", result="listed")
    (record,) = caplog.records
    words = record.getMessage().split(" ")
    assert [w for w in words if w.startswith("plugin=")] == ["plugin=dnsbl"]
    assert [w for w in words if w.startswith("to=")] == ["to=<x@remote.example>"]
    (sender,) = [w for w in words if w.startswith("from=")]
    assert sender == r'from=<"x\x3e\x20plugin=relay\x20result=ok\x20to=\x3cceo@example.com"@example.org>'
    assert sender[6:-1].encode().decode("unicode_escape") == forged
