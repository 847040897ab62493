"""IRC registration as a transition table (``TRANSITIONS[state][event]``)::

    CONNECTING --OPEN--------> REGISTERING --WELCOME--> REGISTERED
        |                          ^
        +--OPEN_CAP--> NEGOTIATING-+ CAP_END (sasl not offered, NAK, SASL done or failed)
                           |       ^
                           +--SASL_ACK--> AUTHENTICATING
    any state --CLOSE--> CLOSED (ERROR from the server, timeouts, no nick accepted)

A server without CAP may answer NICK/USER with 001 while we negotiate, so
NEGOTIATING --WELCOME--> REGISTERED is allowed too. ``IrcSession`` (irc_session.py)
moves through it; a move the table does not hold is a bug and raises
``IllegalTransition``.

This module imports only the standard library and its siblings: it ships
inside VM images.
"""

from __future__ import annotations

import enum
from typing import Final

from .irc_wire import IrcError

__all__ = ["TRANSITIONS", "IllegalTransition", "RegEvent", "RegState"]


class IllegalTransition(IrcError):
    """The registration table has no such move from the current state."""


class RegState(enum.Enum):
    CONNECTING = "connecting"
    NEGOTIATING = "negotiating"
    AUTHENTICATING = "authenticating"
    REGISTERING = "registering"
    REGISTERED = "registered"
    CLOSED = "closed"


class RegEvent(enum.Enum):
    OPEN = "open"  # NICK/USER sent, no CAP
    OPEN_CAP = "open_cap"  # CAP LS sent with NICK/USER
    SASL_ACK = "sasl_ack"  # the server acknowledged CAP REQ sasl
    CAP_END = "cap_end"  # CAP END sent
    WELCOME = "welcome"  # 001
    CLOSE = "close"


_S, _E = RegState, RegEvent
TRANSITIONS: Final[dict[RegState, dict[RegEvent, RegState]]] = {
    _S.CONNECTING: {_E.OPEN: _S.REGISTERING, _E.OPEN_CAP: _S.NEGOTIATING, _E.CLOSE: _S.CLOSED},
    _S.NEGOTIATING: {
        _E.SASL_ACK: _S.AUTHENTICATING,
        _E.CAP_END: _S.REGISTERING,
        _E.WELCOME: _S.REGISTERED,
        _E.CLOSE: _S.CLOSED,
    },
    _S.AUTHENTICATING: {_E.CAP_END: _S.REGISTERING, _E.CLOSE: _S.CLOSED},
    _S.REGISTERING: {_E.WELCOME: _S.REGISTERED, _E.CLOSE: _S.CLOSED},
    _S.REGISTERED: {_E.CLOSE: _S.CLOSED},
    _S.CLOSED: {},
}
