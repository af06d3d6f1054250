"""smtpgate: an anti-spam policy gateway in front of an MTA.

The names here are the whole public API for plugin authors; everything else
in :mod:`gateway` is internal.  Hooks are documented in
:mod:`gateway.hookspecs`.
"""

from .address import Address
from .plugin import Context, Plugin, hookimpl, then
from .replies import Reply
from .session import Envelope, Message, Recipient, Session
from .stash import Stash, StashKey
from .verdict import Action, Verdict

__all__ = [
    "Action",
    "Address",
    "Context",
    "Envelope",
    "Message",
    "Plugin",
    "Recipient",
    "Reply",
    "Session",
    "Stash",
    "StashKey",
    "Verdict",
    "hookimpl",
    "then",
]
