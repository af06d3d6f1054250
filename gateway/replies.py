"""Every reply the gateway itself produces, as named constants.

Wording follows Postfix's where Postfix has a restriction for the same thing,
so administrators recognise our lines in their logs and bounce messages.
Replies that carry a detail (an address, a hostname) are templates filled with
:meth:`Reply.format`.  A test checks that every enhanced code's class matches
its basic code, so a 5yz can never carry a 4.x.x code by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def enhanced_class(enhanced: str) -> int | None:
    """The class (2, 4 or 5) of an RFC 3463 code such as ``"5.7.1"``, or
    None for anything else."""
    match = _ENHANCED.match(enhanced)
    return int(match[1]) if match is not None and match.end() == len(enhanced) else None


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, RFC 3463 enhanced code, text.

    ``text`` may hold several lines separated by ``\\n``; each is sent with
    the code, and with the enhanced code when there is one (RFC 2034 §4).
    """

    code: int
    enhanced: str
    text: str
    #: :meth:`wire`, made once: most replies are constants sent many times.
    _wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A CR inside a line (from a DNS TXT record, say) must not end it.
        lines = self.text.replace("\r", " ").split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = [f"{self.code}-{prefix}{line}" for line in lines[:-1]]
        last = f"{self.code} {prefix}{lines[-1]}"
        # "250" alone stays alone: a trailing blank is not what was said.
        out.append(last if lines[-1] else last.rstrip(" "))
        object.__setattr__(self, "_wire", ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape"))

    def format(self, **fields: object) -> Reply:
        """A copy with ``{name}`` placeholders in the text filled in."""
        # Built directly: dataclasses.replace costs twice as much, and
        # plugins format a few replies for every message.
        return Reply(self.code, self.enhanced, self.text.format(**fields))

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def wire(self) -> bytes:
        """The reply as sent on the wire, CRLF-terminated."""
        return self._wire

    def __str__(self) -> str:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {prefix}{self.text}".replace("\n", " / ")

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """A reply read from another server, kept as it said it.

        The enhanced code is split off the first line so the gateway can log
        and classify it; it is stripped from the following lines only where
        it is the same, so :meth:`wire` sends the lines back unchanged.
        """
        lines = message.split("\n")
        match = _ENHANCED.match(lines[0])
        if not match:
            return cls(code, "", message)
        enhanced = lines[0][: match.end()].strip()
        stripped = []
        for line in lines:
            if line == enhanced or line.startswith(enhanced + " "):
                stripped.append(line[len(enhanced) + 1 :])
            else:
                # A line without the code cannot be sent back verbatim with
                # the code prefixed; keep the reply whole instead.
                return cls(code, "", message)
        return cls(code, enhanced, "\n".join(stripped))


# --- session ---------------------------------------------------------------
GREETING = Reply(220, "", "{hostname} ESMTP smtpgate")
#: The header a TAG verdict without headers of its own puts on the message.
TAG_FIELD = "X-Smtpgate-Tag"
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
HELP = Reply(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

# --- protocol errors (RFC 5321 §4.2.4, Postfix smtpd wording) ---------------
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
#: Postfix's reply (with smtputf8_enable) to a command that is not UTF-8.
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: {command} hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
SYNTAX_NOARG = Reply(501, "5.5.4", "Syntax: {command}")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
#: Postfix's replies to MAIL and RCPT parameters: an unknown one (or a
#: known one with a value it does not take) is named as the client wrote
#: it; a known one with a bad value has its own wording.
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported option: {option}")
BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
SIZE_OVERFLOW = Reply(552, "5.3.4", "Message size exceeds file system imposed limit")
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter syntax")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
#: A DSN parameter from a client not offered DSN (Postfix's answer where
#: smtpd_discard_ehlo_keywords withholds it).
DSN_DISABLED = Reply(501, "5.7.1", "DSN support is disabled")
MULTIPLE_AUTH = Reply(503, "5.5.4", "Error: multiple AUTH= options")
#: Every command but QUIT after a 554 greeting (RFC 5321 §3.1), as Postfix
#: words it with smtpd_delay_reject = no.
ACCESS_DENIED = Reply(503, "5.7.0", "Error: access denied for {client}")
#: RFC 6531 §3.7.4.1, in Postfix's words: UTF-8 in RCPT of a transaction
#: that did not say SMTPUTF8 at MAIL, or in MAIL without it (when offered;
#: otherwise a UTF-8 address is a syntax error).
UTF8_NOT_DECLARED = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
#: Postfix's answer to DATA in a transaction without recipients.
NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN command is disabled")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} Error: too many errors")

# --- XCLIENT (Postfix XCLIENT_README) --------------------------------------
XCLIENT_DENIED = Reply(550, "5.7.0", "Error: insufficient authorization")
XCLIENT_SYNTAX = Reply(501, "5.5.4", "Bad XCLIENT attribute: {attribute}")
XCLIENT_NESTED = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
XCLIENT_NO_ADDR = Reply(501, "5.5.4", "Bad XCLIENT attribute: {attribute}: the client's address is required")

# --- limits ----------------------------------------------------------------
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Error: too many connections from {ip}")
SERVICE_BUSY = Reply(421, "4.7.0", "{hostname} Error: too many connections")
TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: timeout exceeded")
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down, try again later")

# --- DATA hygiene (SMTP smuggling; Postfix smtpd_forbid_bare_newline) -------
BARE_LF = Reply(550, "5.5.2", "Error: bare <LF> received")
BARE_CR = Reply(550, "5.5.2", "Error: bare <CR> received")

# --- failures that must make the client retry (promise 1) -------------------
PLUGIN_FAILED = Reply(451, "4.3.0", "Error: internal policy failure, try again later")
UPSTREAM_UNAVAILABLE = Reply(421, "4.4.1", "{hostname} Error: next hop unavailable, try again later")
UPSTREAM_FAILED = Reply(451, "4.4.1", "Error: next hop failed during the transaction, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")

# --- scoring ([scoring] thresholds) ----------------------------------------
SCORE_REJECT = Reply(554, "5.7.1", "Error: message rejected as spam (score {score:.1f})")
SCORE_DEFER = Reply(451, "4.7.1", "Error: message deferred, spam score {score:.1f}, try again later")

# --- built-in plugins -------------------------------------------------------
# Kept here rather than in each plugin so the whole vocabulary is in one place
# and checked by one test; third-party plugins build their own Reply values.
RELAY_DENIED = Reply(554, "5.7.1", "<{address}>: Relay access denied")
