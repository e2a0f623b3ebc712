"""Sans-IO SMTP protocol core: parses client bytes into events and serialises replies, doing no I/O.

Untrusted input: all client bytes, via ``ServerConnection.receive_data``; see the submodules.
"""

from .commands import Bdat, CommandParser, Data, Forbidden, Help, Noop, Rset, Vrfy
from .data import BdatDecoder, ContentScanner, DataDecoder
from .events import (
    NEED_DATA,
    BdatChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Mail,
    NeedData,
    Quit,
    Rcpt,
    Reset,
    StartTls,
    Transaction,
)
from .limits import Limits
from .params import decode_xtext
from .server import ServerConnection
from .settings import ServerSettings
from .state import State

__all__ = [
    "NEED_DATA",
    "Bdat",
    "BdatChunkEnd",
    "BdatDecoder",
    "CommandParser",
    "ConnectionClosed",
    "ContentScanner",
    "Data",
    "DataChunk",
    "DataDecoder",
    "DataEnd",
    "DataStart",
    "Ehlo",
    "Event",
    "Forbidden",
    "Help",
    "Limits",
    "Mail",
    "NeedData",
    "Noop",
    "Quit",
    "Rcpt",
    "Reset",
    "Rset",
    "ServerConnection",
    "ServerSettings",
    "StartTls",
    "State",
    "Transaction",
    "Vrfy",
    "decode_xtext",
]
