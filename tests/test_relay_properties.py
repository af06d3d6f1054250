"""Property tests of the relay decision: no open relay by any address trick.

RCPT paths are generated from the classic tricks, combined at random: the
percent hack (``user%remote@local``), source routes (``@a,@b:user@local``),
bang paths (``remote!user@local``), quoted local parts hiding ``@``, ``%``
or ``!`` (``"user@remote"@local``), quoted-pair escapes, ``user@remote@local``,
address literals, trailing dots, mixed case, subdomains and look-alikes of
the local domains, IDNA and UTF-8 domains.

The oracle, :func:`destinations`, is written here and shares no code with
the gateway: it lists every domain a mail for the path could be routed to by
an MTA that honours source routes, the percent hack and bang paths, and that
looks for them inside quoted local parts too (Postfix's
``resolve_dequoted_address``).  The promise checked is one-sided: when the
plugin lets an outside client's recipient through, every one of those
destinations is a local domain.  The plugin may refuse more (it refuses
``user%example.com@example.com``, whose destinations are all local).

``tests/e2e/test_relay_differential.py`` asks the real Postfix the same
question.
"""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

from gateway import Action, Address, Context, Recipient, Session, Verdict
from gateway.address import PathError, parse_path
from gateway.config import GatewaySettings
from gateway.replies import Reply
from plugins.relay import Finding, RelayPlugin, classify

#: Two local domains: one a parent of nothing else listed, one whose parent
#: (``example.net``) is *not* local.
LOCAL_DOMAINS = ("example.com", "lists.example.net")
SETTINGS = GatewaySettings(
    hostname="gw.example.net",
    local_domains=LOCAL_DOMAINS,
    trusted_networks=("198.51.100.0/24",),
)
CONTEXT = Context(SETTINGS)
OUTSIDE = ipaddress.ip_address("203.0.113.5")
INSIDE = ipaddress.ip_address("198.51.100.7")

# --- the oracle ------------------------------------------------------------------

#: Stands for "wherever the next hop completes an unqualified address":
#: never one of ours.
UNQUALIFIED = "<unqualified>"
#: The bare ``<Postmaster>`` of RFC 5321 §4.5.1: delivered to this site's
#: postmaster, never relayed.
POSTMASTER = "<postmaster>"


def _norm(domain: str) -> str:
    # Postfix folds case with full Unicode case folding and drops one
    # trailing dot before it compares a domain with its tables.
    domain = domain.casefold()
    return domain[:-1] if domain.endswith(".") and not domain.endswith("..") else domain


def dequote(local: str) -> str:
    """A local part as an MTA sees it inside: quotes gone, quoted pairs
    (inside quotes or not) resolved."""
    out = []
    i = 0
    while i < len(local):
        c = local[i]
        if c == "\\" and i + 1 < len(local):
            out.append(local[i + 1])
            i += 2
            continue
        if c != '"':
            out.append(c)
        i += 1
    return "".join(out)


def _routed(local: str, depth: int = 0) -> set[str]:
    """Destinations named by routing operators in a dequoted local part."""
    found: set[str] = set()
    if depth > 20:  # every step shortens the text; this only bounds the recursion
        return {UNQUALIFIED}
    at = max(local.rfind("@"), local.rfind("%"))
    if at >= 0:
        # user@host and user%host: the rightmost operator names the next hop;
        # "@a:user" (a source route hidden in the local part) names "a:user".
        found.add(_norm(local[at + 1 :]))
        found |= _routed(local[:at], depth + 1)
    bang = local.find("!")
    if bang >= 0:
        found.add(_norm(local[:bang]))
        found |= _routed(local[bang + 1 :], depth + 1)
    return found


def destinations_of(route: list[str], local: str, domain: str | None) -> set[str]:
    """Every domain a mail to ``route:local@domain`` may be sent to."""
    found = {_norm(d) for d in route}
    inner = dequote(local)
    if domain is None:
        bare = inner.casefold() == "postmaster" and local == inner and not route
        found.add(POSTMASTER if bare else UNQUALIFIED)
    else:
        found.add(_norm(domain))
    return found | _routed(inner)


def split_path(path: str) -> tuple[list[str], str, str | None]:
    """(source route domains, local part as written, domain or None).

    The route ends at the first ``:`` outside an address literal; the
    domain starts after the rightmost ``@`` outside quotes and literals.
    """
    route: list[str] = []
    rest = path
    if path.startswith("@"):
        depth = 0
        for i, c in enumerate(path):
            depth += c == "["
            depth -= c == "]"
            if c == ":" and depth <= 0:
                route = [d.removeprefix("@") for d in path[:i].split(",")]
                rest = path[i + 1 :]
                break
    quoted = escaped = False
    depth = 0
    last_at = -1
    for i, c in enumerate(rest):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted:
            depth += c == "["
            depth -= c == "]"
            if c == "@" and depth <= 0:
                last_at = i
    if last_at < 0:
        return route, rest, None
    return route, rest[:last_at], rest[last_at + 1 :]


def destinations(path: str) -> set[str]:
    return destinations_of(*split_path(path))


def route_domains(address: Address) -> list[str]:
    """``@a,@b:`` as ``["a", "b"]``."""
    return [d.removeprefix("@") for d in address.route[:-1].split(",")] if address.route else []


def is_ours(destination: str, *, subdomains: bool = False) -> bool:
    if destination == POSTMASTER or destination in LOCAL_DOMAINS:
        return True
    return subdomains and any(destination.endswith("." + d) for d in LOCAL_DOMAINS)


# --- what the gateway does -------------------------------------------------------


def plugin(*, allow_subdomains: bool = False) -> RelayPlugin:
    return RelayPlugin(RelayPlugin.Options(allow_subdomains=allow_subdomains), CONTEXT, "relay")


PLUGINS = {False: plugin(), True: plugin(allow_subdomains=True)}


def session(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Session:
    # As the core does at connect and after XCLIENT.
    return Session(client_ip=ip, trusted=CONTEXT.is_trusted(ip))


def parse(path: str) -> Address | None:
    """The address the core hands the plugin, None when the core answers
    ``501 5.1.3`` itself (SMTPUTF8 declared: the most the parser accepts)."""
    try:
        return parse_path(f"TO:<{path}>", "TO", utf8=True)[0]
    except PathError:
        return None


def verdict(address: Address, ip=OUTSIDE, *, allow_subdomains: bool = False) -> Verdict:
    hook = PLUGINS[allow_subdomains].rcpt
    return hook(session=session(ip), recipient=Recipient(address))


def denied(mailbox: str) -> Reply:
    return Reply(554, "5.7.1", f"<{mailbox}>: Relay access denied")


# --- generated paths -------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
PLAIN_ATEXT = ATEXT.replace("!", "").replace("%", "")
UTF8_CHARS = "äöüßЖж中ｅ＠％！ſKİı\u00a0"
USERS = ["alice", "Bob", "user", "postmaster", "Postmaster", "x", "first.last", "jörg"]
REMOTE = [
    "remote.example",
    "example.net",
    "notexample.com",
    "example.co",
    "com",
    "example.com.remote.example",
    "lists.example.net.remote.example",
    "exämple.com",
    "xn--exmple-cua.com",
    "ｅｘａｍｐｌｅ.com",
    "example。com",
    "bücher.example",
    "\u212aiosk.example",
    "example.c\u043em",  # Cyrillic o
]
LITERALS = [
    "[127.0.0.1]",
    "[192.0.2.1]",
    "[IPv6:::1]",
    "[ipv6:2001:db8::1]",
    "[example.com]",
    "[256.1.1.1]",
    "[]",
]

# Strategies are built from one_of/builds/map rather than lists and
# composites: Hypothesis pays per draw, and this file must stay fast.


def weighted(*choices: tuple[int, st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    """``one_of`` with weights.  (Repeating a branch in ``one_of`` does not
    weigh it: equal strategies are one cached object, counted once.)"""
    options = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(options))).flatmap(options.__getitem__)


atoms = st.one_of(
    st.sampled_from(USERS),
    st.text(alphabet=ATEXT, min_size=1, max_size=6),
    st.text(alphabet=ATEXT + UTF8_CHARS, min_size=1, max_size=4),
)
dot_atoms = st.one_of(atoms, st.tuples(atoms, atoms).map(".".join))
labels = st.one_of(
    st.sampled_from(["sub", "a", "mail", "example", "com", "xn--bcher-kva", "bücher"]),
    # Some are not valid labels ("-a"): the parser must refuse those.
    st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=6),
)
local_domain = st.sampled_from(LOCAL_DOMAINS)


def _join(*parts: str) -> str:
    return "".join(parts)


domains = weighted(
    (2, local_domain),
    # Trailing dots, also the ideographic full stop IDNA maps to a dot.
    (1, st.builds(_join, local_domain, st.sampled_from([".", "..", "。"]))),
    # Subdomains.
    (1, st.builds("{}.{}".format, labels, local_domain)),
    (1, st.builds("{}.{}.{}".format, labels, labels, local_domain)),
    (2, st.sampled_from(REMOTE)),
    (1, st.sampled_from(LITERALS)),
    (1, st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 4 else f"[IPv6:{ip}]")),
    (1, st.one_of(labels, st.builds("{}.{}".format, labels, labels))),
)


def quote(text: str, escape_all: bool) -> str:
    """``text`` as an RFC 5321 quoted string; with ``escape_all`` every
    character is a quoted pair where that is allowed (``\\@``, ``\\%``...)."""
    out = []
    for c in text:
        if c in '"\\' or (escape_all and " " <= c <= "~"):
            out.append("\\" + c)
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _backslashed(text: str) -> str:
    # Quoted pairs are not allowed outside quotes: the parser must refuse
    # them, or the oracle must still see the operators.
    return "".join("\\" + c if c in "@%!." else c for c in text)


#: A local part's text before quoting: plain, or with a routing trick.
raw_locals = weighted(
    (3, dot_atoms),
    (1, st.builds("{}%{}".format, atoms, domains)),
    (1, st.builds("{}%{}%{}".format, atoms, domains, domains)),
    (1, st.builds("{}!{}".format, domains, atoms)),
    (1, st.builds("{}@{}".format, atoms, domains)),
    (1, st.builds("@{}:{}".format, domains, atoms)),
    (1, st.builds("{}!{}%{}".format, domains, atoms, domains)),
)
#: The same, written as the client may write it.
local_parts = st.builds(
    lambda raw, form: form(raw),
    raw_locals,
    st.sampled_from(
        [
            *[lambda raw: raw] * 3,
            *[lambda raw: quote(raw, escape_all=False)] * 3,
            lambda raw: quote(raw, escape_all=True),
            lambda raw: f'"{raw}"',  # not escaped: may be broken, may end early
            _backslashed,
        ]
    ),
)
#: The domain after the last "@": mostly ours, so that what the local part
#: and the route say is what decides.
outer_domains = weighted(
    (2, st.sampled_from([*LOCAL_DOMAINS, "EXAMPLE.COM", "Example.Com", "LISTS.example.NET"])),
    (1, domains),
)
routes = st.one_of(
    st.builds("@{}:".format, domains),
    st.builds("@{},@{}:".format, domains, domains),
)
#: A whole RCPT path (without the angle brackets).
paths = weighted(
    (6, st.builds("{}@{}".format, local_parts, outer_domains)),
    (2, st.builds("{}{}@{}".format, routes, local_parts, outer_domains)),
    (1, st.builds("{}@{}@{}".format, local_parts, domains, outer_domains)),
    (1, st.one_of(local_parts, st.sampled_from(["Postmaster", "postmaster", '"Postmaster"', "POSTMASTER"]))),
)


def recased(text: str) -> st.SearchStrategy[str]:
    """``text`` with the case of each ASCII letter chosen at random."""
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda flips: "".join(c.swapcase() if flip and c.isascii() else c for c, flip in zip(text, flips))
    )


# Hand-picked paths that the generator reaches only by luck.
CLASSICS = [
    "user%remote.example@example.com",
    "user%example.com@example.com",
    "remote.example!user@example.com",
    '"user@remote.example"@example.com',
    '"user\\@remote.example"@example.com',
    '"@remote.example:user"@example.com',
    '"user%remote.example"@EXAMPLE.COM',
    "@remote.example:user@example.com",
    "@example.com:user@remote.example",
    "@[127.0.0.1]:user@example.com",
    "@example.com,@remote.example:user@example.com",
    "user@remote.example@example.com",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@example.com.",
    "user@sub.example.com",
    "user@example.net",
    "user@x.lists.example.net",
    "user@ｅｘａｍｐｌｅ.com",
    "user@\u212aiosk.example",
    "Postmaster@remote.example",
    "Postmaster",
    '"Postmaster"',
    "user",
]


def examples(*values: str):
    """``@example(path=...)`` for each value."""

    def mark(f):
        for value in reversed(values):
            f = example(path=value)(f)
        return f

    return mark


# --- parse_path ------------------------------------------------------------------


def _insert(path: str, junk: str, at: int) -> str:
    return f"<{path[:at]}{junk}{path[at:]}>"


@given(
    keyword=st.sampled_from(["TO", "TO", "TO", "FROM"]),
    arg=st.one_of(
        st.text(max_size=60),
        # Mostly the characters that carry syntax.
        st.text(alphabet='<>"\\@:,.[]%! aZ', max_size=16),
        st.builds(lambda path, end: f"<{path}>"[:end], paths, st.integers(0, 30)),
        paths.map("<{}>".format),
        paths,  # without brackets, as Postfix also takes
        paths.map(" <{}> NOTIFY=NEVER".format),
        st.builds(_insert, paths, st.text(alphabet='<>"\\ :,@[]()\x00\r\n\t\x7f', max_size=3), st.integers(0, 40)),
        st.text(alphabet=ATEXT, min_size=250, max_size=300).map("<{}@example.com>".format),
    ),
    prefix=st.sampled_from(["", "", "", "X", "to", ":"]),
    utf8=st.booleans(),
)
@example(keyword="TO", arg="<", prefix="", utf8=False)
@example(keyword="TO", arg='<"">', prefix="", utf8=False)
@example(keyword="TO", arg='<"\\">', prefix="", utf8=True)
@example(keyword="TO", arg="<@:>", prefix="", utf8=False)
@example(keyword="TO", arg="<@>", prefix="", utf8=False)
@example(keyword="FROM", arg=" ", prefix="", utf8=False)
@settings(max_examples=250)
def test_parse_path_raises_nothing_but_path_error(keyword: str, arg: str, prefix: str, utf8: bool) -> None:
    # prefix: mostly the keyword as it should be, sometimes wrong.
    text = f"{keyword}:{arg}" if not prefix else f"{prefix}{arg}"
    try:
        address, _, _ = parse_path(text, keyword, utf8=utf8)
    except PathError:
        return
    assert isinstance(address, Address)


# --- the promise -----------------------------------------------------------------


@given(path=paths)
@examples(*CLASSICS)
@settings(max_examples=300)
def test_generated_recipient(path: str) -> None:
    """One generated path, every promise the relay decision makes about it."""
    address = parse(path)
    if address is None:
        event("501 5.1.3 from the core")
        return  # nothing relayed
    event(f"finding: {classify(address, CONTEXT.is_local_domain)}")
    where = destinations(path)
    note(f"destinations: {sorted(where)}")

    # The oracle reads the client's text, the plugin judges the parsed
    # address, the next hop gets address.path: all three must be the same.
    assert address.path == path
    assert split_path(path) == (route_domains(address), address.local, address.domain or None)

    for subdomains in (False, True):
        # An outside client reaches nothing but our domains; when refused it
        # reads Postfix's wording, on one line, naming the mailbox.
        v = verdict(address, allow_subdomains=subdomains)
        if v.action is Action.CONTINUE:
            assert all(is_ours(d, subdomains=subdomains) for d in where), (subdomains, v.result)
            assert v.result in ("relay=local", "relay=postmaster")
        else:
            assert v.action is Action.REJECT
            assert v.reply == denied(address.mailbox)
            assert v.reply.wire().count(b"\r\n") == 1
            assert v.result.startswith("relay=denied ")

        # A trusted client is never refused.
        v = verdict(address, INSIDE, allow_subdomains=subdomains)
        assert (v.action, v.reply) == (Action.CONTINUE, None)
        assert v.result.startswith("relay=")

    # allow_subdomains changes the verdict on subdomains and nothing else.
    strict = classify(address, CONTEXT.is_local_domain)
    loose = classify(address, CONTEXT.is_local_domain, allow_subdomains=True)
    if strict is Finding.SUBDOMAIN:
        assert loose is Finding.LOCAL or not loose.is_local
    else:
        assert loose is strict


@given(data=st.data(), path=paths)
@settings(max_examples=100)
def test_decision_ignores_ascii_case(data: st.DataObject, path: str) -> None:
    variant = data.draw(recased(path), label="variant")
    address, other = parse(path), parse(variant)
    assert (address is None) == (other is None)
    if address is None or other is None:
        return
    for subdomains in (False, True):
        a, b = verdict(address, allow_subdomains=subdomains), verdict(other, allow_subdomains=subdomains)
        assert (a.action, a.result) == (b.action, b.result)


# --- it is not a plugin that refuses everything -----------------------------------

plain_locals = st.one_of(
    st.text(alphabet=PLAIN_ATEXT, min_size=1, max_size=8),
    st.builds("{}.{}".format, st.text(alphabet=PLAIN_ATEXT, min_size=1, max_size=5), st.text(alphabet=PLAIN_ATEXT, min_size=1, max_size=5)),
    st.text(alphabet=PLAIN_ATEXT + ' .,:;<>()[]"\\', max_size=10).map(lambda t: quote(t, escape_all=False)),
    st.text(alphabet=PLAIN_ATEXT, max_size=6).map(lambda t: quote(t, escape_all=True)),
)


@given(data=st.data(), local=plain_locals, domain=local_domain)
@settings(max_examples=100)
def test_plain_local_recipient_is_accepted(data: st.DataObject, local: str, domain: str) -> None:
    path = f"{local}@{data.draw(recased(domain), label='domain')}"
    address = parse(path)
    assert address is not None, path
    v = verdict(address)
    assert (v.action, v.reply, v.result) == (Action.CONTINUE, None, "relay=local")


TRICKS = {
    "percent hack": "{local}%{elsewhere}@{domain}",
    "bang path": "{elsewhere}!{local}@{domain}",
    "source route": "@{elsewhere}:{local}@{domain}",
    "route through us": "@{domain}:{local}@{elsewhere}",
    "quoted @": '"{bare}@{elsewhere}"@{domain}',
    "quoted %": '"{bare}%{elsewhere}"@{domain}',
    "quoted !": '"{elsewhere}!{bare}"@{domain}',
    "escaped @": '"{bare}\\@{elsewhere}"@{domain}',
    "double @": "{local}@{elsewhere}@{domain}",
    "trailing dot": "{local}@{domain}.",
    "subdomain": "{local}@mail.{domain}",
    "literal": "{local}@[127.0.0.1]",
}


@given(
    local=plain_locals,
    domain=local_domain,
    elsewhere=st.sampled_from(["remote.example", "example.net", "x.example", "com", "[192.0.2.1]"]),
    trick=st.sampled_from(sorted(TRICKS)),
)
@settings(max_examples=150)
def test_any_trick_on_a_local_recipient_is_refused(local: str, domain: str, elsewhere: str, trick: str) -> None:
    # "bare": the local part's text inside a quoted string (still quoted
    # pairs, so that the whole stays one quoted string).
    bare = local[1:-1] if local.startswith('"') else local
    path = TRICKS[trick].format(local=local, bare=bare, domain=domain, elsewhere=elsewhere)
    address = parse(path)
    if address is not None:  # else 501 5.1.3
        v = verdict(address)
        assert v.action is Action.REJECT, path
        assert v.reply == denied(address.mailbox)


# --- hand-built addresses: safe even if the parser is ever loosened --------------

#: Local parts the parser would refuse, put together from pieces that matter.
odd_locals = st.lists(
    st.sampled_from(['"', "\\", "@", "%", "!", ":", ",", " ", ".", "x", "remote.example", "Postmaster", "ä"]),
    max_size=6,
).map("".join)


def _balanced(local: str) -> bool:
    # See test_local_part_with_an_open_quote_hides_its_last_character.
    return not (len(local) >= 2 and local.startswith('"') and not local.endswith('"'))


def _unparsed(path: str) -> Address:
    """The address ``path`` stands for, whether or not the parser takes it."""
    route, local, domain = split_path(path)
    return Address(local, domain or "", ",".join("@" + d for d in route) + ":" if route else "")


hand_built = st.one_of(
    paths.map(_unparsed),
    st.builds(Address, odd_locals.filter(_balanced), st.one_of(outer_domains, st.just("")), st.sampled_from(["", "", "@remote.example:"])),
)


@given(address=hand_built)
@example(address=Address("user@remote.example", "example.com"))
@example(address=Address("user", "example.com."))
@example(address=Address('"postmaster"', ""))
@example(address=Address("postmaster", "", "@remote.example:"))
@settings(max_examples=150)
def test_hand_built_address_reaches_only_local_domains(address: Address) -> None:
    where = destinations_of(route_domains(address), address.local, address.domain or None)
    note(f"destinations: {sorted(where)}")
    v = verdict(address)
    if v.action is Action.CONTINUE:
        assert all(is_ours(d) for d in where)
    else:
        assert v.reply == denied(address.mailbox)


# Unreachable through parse_path, which requires the closing quote; the
# plugin must not rely on that.
@pytest.mark.parametrize("local", ['"remote.example!', '"user@', '"user%', '"user%\\"'])
def test_local_part_with_an_open_quote_keeps_its_last_character(local: str) -> None:
    address = Address(local, "example.com")
    assert classify(address, CONTEXT.is_local_domain) is not Finding.LOCAL
