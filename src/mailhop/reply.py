"""SMTP replies (RFC 5321 4.2) with enhanced status codes (RFC 3463), and the catalogue we send.

Peer-visible text is deliberately generic; detail for operators travels in logs, never here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["R", "Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code and one or more text lines."""

    code: int
    enhanced: str = ""
    text: str = ""
    extra: tuple[str, ...] = ()

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The text lines, enhanced code included on each (RFC 2034 section 4)."""
        prefix = f"{self.enhanced} " if self.enhanced else ""
        first = f"{prefix}{self.text}".rstrip()
        return [first, *(f"{prefix}{line}".rstrip() for line in self.extra)]

    def to_bytes(self) -> bytes:
        """Wire form: multi-line replies use 'code-' on all lines but the last."""
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            # Never let a CR or LF from a caller's text split the reply on the wire.
            clean = line.replace("\r", " ").replace("\n", " ")
            out.append(f"{self.code}{sep}{clean}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text, self.extra)

    def __str__(self) -> str:
        return " ".join(filter(None, (str(self.code), self.enhanced, self.text)))


class R:
    """The catalogue of standard replies; every reply mailhop's server sends from its core is here."""

    OK = Reply(250, "2.0.0", "OK")
    SENDER_OK = Reply(250, "2.1.0", "Sender OK")
    RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
    RESET_OK = Reply(250, "2.0.0", "Reset OK")
    NOOP_OK = Reply(250, "2.0.0", "OK")
    START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
    VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
    HELP = Reply(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
    BYE = Reply(221, "2.0.0", "Bye")
    READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")

    SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
    TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
    TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
    TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
    SPOOL_UNAVAILABLE = Reply(421, "4.3.2", "Spool unavailable, try again later")
    LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
    INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
    TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
    TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")

    SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
    LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
    BARE_NEWLINE_CMD = Reply(500, "5.5.2", "Bare CR or LF in command line")
    NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
    BAD_ARGS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
    BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
    BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
    BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
    NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
    NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
    NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
    NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
    PARAM_NOT_IMPLEMENTED = Reply(555, "5.5.4", "Unsupported parameter")
    MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
    DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Text line too long")
    BARE_NEWLINE_DATA = Reply(550, "5.6.0", "Message contains bare CR or LF, see RFC 5321 section 2.3.8")
    BAD_BDAT_CHUNK = Reply(500, "5.5.2", "Syntax error in BDAT command")
    MAIL_LOOP = Reply(554, "5.4.6", "Too many Received headers, mail loop detected")
    RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
    SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "SMTPUTF8 required for non-ASCII address")
    NO_SERVICE = Reply(554, "5.3.2", "Service not available")
    TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
    NOT_8BIT_CLEAN = Reply(554, "5.6.1", "Invalid message content")
