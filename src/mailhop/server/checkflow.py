"""The I/O around the data phase of the checks: reading the spooled message back for content checks, and
writing the header edits (our Authentication-Results, filter headers, forged-field removal) into the spool."""

from __future__ import annotations

import asyncio
import logging
import re

from ..checks.api import CheckContext
from ..checks.authresults import claims_authserv_id, format_value
from ..message.edit import fold, rewrite_header_block
from ..message.headers import HeaderScanner
from ..queue.spool import BodyWriter

__all__ = ["apply_header_edits", "read_for_checks"]

log = logging.getLogger("mailhop.checks")

_AUTH_RESULTS = re.compile(rb"(?:^|\n)authentication-results[ \t]*:", re.IGNORECASE)


async def read_for_checks(body: BodyWriter, offset: int, max_size: int) -> bytes | None:
    """The message as the client sent it (after our Received:), or None when it is over ``max_size``."""
    if body.size - offset > max_size:
        return None
    if body.is_file_backed:
        return await asyncio.to_thread(body.read_back, offset)
    return body.read_back(offset)


async def apply_header_edits(body: BodyWriter, received: bytes, headers: HeaderScanner,
                             checks: CheckContext | None, authserv_id: str) -> None:
    """Rewrite the stored header section (which follows our ``received`` field) if anything asks for it; the
    common case (nothing to do) costs one regex scan of the header block."""
    block = headers.block
    forged = bool(authserv_id) and _AUTH_RESULTS.search(block) is not None
    edits = checks.header_edits if checks is not None else []
    results = checks.auth_results if checks is not None else []
    if not (forged or edits or results):
        return
    if headers.truncated:
        log.warning("header edits skipped id=%s: header section over %d octets", body.queue_id, len(block))
        return
    top = [fold("Authentication-Results", format_value(authserv_id, results))] if results else []
    core = block[:-2] if block.endswith(b"\r\n") else block

    def drop(name: str, raw: bytes) -> bool:
        if name == "authentication-results" and claims_authserv_id(raw, authserv_id):
            log.info("removed a forged Authentication-Results claiming %s id=%s", authserv_id, body.queue_id)
            return True
        return False

    new_block = rewrite_header_block(core, edits, top=top, drop=drop if forged else None)
    if not core and new_block:
        new_block += b"\r\n"  # the message had no header section: the new fields end before its blank line
    elif core and not new_block:
        # Every field was removed: drop the CRLF that ended the last one, so the blank line stays the boundary.
        core += b"\r\n"
    old_len = len(received) + len(core)
    if body.is_file_backed:
        await asyncio.to_thread(body.replace_head, old_len, received + new_block)
    else:
        body.replace_head(old_len, received + new_block)
