"""Protocol limits for the SMTP server core, each with the RFC text or precedent it comes from.

Untrusted input: none directly; these numbers bound how much of a client's input the core will hold,
parse or count, so every one of them is a resource-exhaustion defence as much as a protocol rule.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Named limits for one SMTP server; the defaults are safe for a public MX."""

    #: Longest command line, CRLF included. RFC 5321 4.5.3.1.4 says at least 512; a longer line is read to
    #: its end and discarded (never buffered) and answered with one 500.
    max_command_line: int = 512
    #: Longest text line of message content, CRLF included (RFC 5321 4.5.3.1.6: 1000 octets, the leading
    #: dot added for transparency not counted). Longer lines are flagged, not cut.
    max_text_line: int = 1000
    #: Recipients accepted per transaction. RFC 5321 4.5.3.1.8 requires at least 100; more are refused
    #: with 452 4.5.3 (4.5.3.1.10) so the client retries them in another transaction.
    max_recipients: int = 1000
    #: Largest message content in octets (after dot-unstuffing), advertised as SIZE (RFC 1870).
    max_message_size: int = 52_428_800
    #: Error replies (4xx/5xx) per connection before the core sends 421 and closes; the precedent is
    #: Postfix's smtpd_hard_error_limit (default 20).
    max_errors: int = 20
    #: Extra RCPTs past max_recipients are answered 452 4.5.3 (RFC 5321 4.5.3.1.10: the client sends them in
    #: a later transaction); only past this overshoot do they count as errors (Postfix's
    #: smtpd_recipient_overshoot_limit), so a client pipelining a long list does not lose the whole session.
    recipient_overshoot: int = 1000
    #: Digits accepted in a BDAT chunk size or a SIZE value. RFC 1870 size-value is 1*20DIGIT; RFC 3030
    #: sets no chunk size limit beyond the message size, but parsing an unbounded digit string is itself
    #: a denial-of-service (int() is quadratic on huge inputs), so longer numbers are refused.
    max_bdat_digits: int = 20
    #: Longest line of an AUTH exchange (the client's SASL response), CRLF included. RFC 4954 4: a server
    #: MUST accept 12288 octets there, since SASL responses outgrow a command line. Longer lines are read
    #: to their end (never buffered), answered 500 5.5.6 and end the exchange. The core uses the larger of
    #: this and max_command_line.
    max_auth_line: int = 12288
    #: Seconds to wait for a command (RFC 5321 4.5.3.2.7: server timeout, at least 5 minutes).
    command_timeout: float = 300.0
    #: Seconds to wait for each read of message content (RFC 5321 4.5.3.2.5: data block, 3 minutes).
    data_timeout: float = 180.0

    def __post_init__(self) -> None:
        # A limit below these floors would make the core refuse well-formed traffic or mis-detect markers.
        if self.max_command_line < 16:
            raise ValueError("max_command_line must be at least 16")
        if self.max_text_line < 3:
            raise ValueError("max_text_line must be at least 3")
        if self.max_recipients < 1 or self.max_errors < 1 or self.max_message_size < 1:
            raise ValueError("max_recipients, max_errors and max_message_size must be positive")
        if self.max_auth_line < 16:
            raise ValueError("max_auth_line must be at least 16")
        if not 1 <= self.max_bdat_digits <= 20:
            raise ValueError("max_bdat_digits must be between 1 and 20")
        if self.command_timeout <= 0 or self.data_timeout <= 0:
            raise ValueError("timeouts must be positive")
