"""smtpgate: an anti-spam policy gateway in front of an MTA.

The names here are the whole public API for plugin authors; everything else
in :mod:`gateway` is internal.  Hooks are documented in
:mod:`gateway.hookspecs`.
"""

import importlib.metadata

from .actions import ActionOptions, ActionSpec, check_actions, decide
from .address import Address
from .plugin import Context, Plugin, hookimpl, then
from .replies import Reply
from .session import Envelope, Message, Recipient, Session
from .stash import Stash, StashKey
from .verdict import Action, Verdict

try:
    __version__ = importlib.metadata.version("smtpgate")
except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
    __version__ = "unknown"

__all__ = [
    "__version__",
    "Action",
    "ActionOptions",
    "ActionSpec",
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
    "check_actions",
    "decide",
    "hookimpl",
    "then",
]
