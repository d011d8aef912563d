"""Table tests for resolver/reply.py: upstream replies packed by dnslib, scanned once and
rendered for other clients, read back by dnspython."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from dnslib import EDNS0, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.message import constants, wire
from resolver.message.query import Query
from resolver.message.reply import Reply, TtlPolicy, failure, render, render_stale, scan_reply
from tests.dnsmsg import Asked, Edns, Said, Shape, query, response, summary

POLICY = TtlPolicy()
SOA_3600_300 = ("example.org. 3600 IN SOA ns.example.org. hostmaster.example.org. "
                "1 7200 900 1209600 300")
SOA_100_300 = ("example.org. 100 IN SOA ns.example.org. hostmaster.example.org. "
               "1 7200 900 1209600 300")
SOA_DAY = ("example.org. 86400 IN SOA ns.example.org. hostmaster.example.org. "
           "1 7200 900 1209600 86400")
NS = ("example.org. 3600 IN NS ns1.example.org.", "example.org. 3600 IN NS ns2.example.org.")
GLUE = ("ns1.example.org. 3600 IN A 192.0.2.53", "ns2.example.org. 3600 IN AAAA 2001:db8::53")


def scan(data: bytes, policy: TtlPolicy = POLICY) -> Reply:
    """scan_reply as forward.py calls it: qend from the question we sent (same length)."""
    qend = wire.skip_name(data, 12) + 4
    return scan_reply(data, qend, policy)


# name, qtype, response() keyword arguments
REPLIES: dict[str, tuple[str, str, Said]] = {
    "a": ("www.example.org", "A", {"answer": ("www.example.org. 300 IN A 192.0.2.1",
                                              "www.example.org. 300 IN A 192.0.2.2")}),
    "cname-chain": ("www.example.org", "A", {"answer": (
        "www.example.org. 3600 IN CNAME cdn.example.net.",
        "cdn.example.net. 600 IN CNAME edge.cdn.example.net.",
        "edge.cdn.example.net. 60 IN A 192.0.2.7")}),
    "referral-like": ("example.org", "MX", {
        "answer": ("example.org. 900 IN MX 10 mail.example.org.",),
        "authority": NS, "additional": GLUE}),  # names compress into each other
    "nxdomain": ("nope.example.org", "A", {"rcode": constants.NXDOMAIN,
                                           "authority": (SOA_3600_300,)}),
    "nodata": ("www.example.org", "AAAA", {"authority": (SOA_3600_300,)}),
    "nodata-no-soa": ("www.example.org", "AAAA", {"authority": NS}),
    "servfail": ("www.example.org", "A", {"rcode": constants.SERVFAIL}),
    "refused": ("www.example.org", "A", {"rcode": constants.REFUSED}),
    "opt-last": ("www.example.org", "MX", {
        "answer": ("www.example.org. 300 IN MX 10 mx.example.org.",),
        "additional": ("mx.example.org. 300 IN A 192.0.2.25",), "opt": "last"}),
    "opt-first": ("www.example.org", "MX", {  # the slow path: OPT not last
        "answer": ("www.example.org. 300 IN MX 10 mx.example.org.",),
        "additional": ("mx.example.org. 300 IN A 192.0.2.25",
                       "mx.example.org. 300 IN AAAA 2001:db8::25"), "opt": "first"}),
    "nxdomain-opt-first": ("nope.example.org", "A", {
        "rcode": constants.NXDOMAIN, "authority": (SOA_3600_300,),
        "additional": ("ns.example.org. 60 IN A 192.0.2.53",), "opt": "first"}),
    "ad": ("www.example.org", "A", {"answer": ("www.example.org. 300 IN A 192.0.2.1",),
                                    "ad": True, "opt": "last"}),
    "txt": ("t.example.org", "TXT", {"answer": ('t.example.org. 300 IN TXT "hello" "world"',)}),
}

CLIENTS = [  # how the client that gets the reply asked
    pytest.param({}, id="plain"),
    pytest.param({"qid": 0xFFFF, "edns": True}, id="edns"),
    pytest.param({"qid": 0, "edns": True, "do": True}, id="do"),
    pytest.param({"qid": 7, "ad": True}, id="ad"),
    pytest.param({"qid": 8, "cd": True, "rd": False, "edns": True, "udp": 4096}, id="cd-nord"),
]


def client_name(name: str) -> str:
    """The same name in another case, as a 0x20-randomising client might send it."""
    return "".join(c.upper() if i % 2 else c for i, c in enumerate(name))


def expected_flags(q: Query, upstream_flags: int) -> frozenset[str]:
    flags = {"QR", "RA"}
    if q.flags & constants.RD:
        flags.add("RD")
    if q.flags & constants.CD:
        flags.add("CD")
    if upstream_flags & constants.AD and (q.do or q.flags & constants.AD):
        flags.add("AD")
    return frozenset(flags)


@pytest.mark.parametrize("case", REPLIES)
@pytest.mark.parametrize("client", CLIENTS)
def test_render_equals_upstream_reply(case: str, client: Asked) -> None:
    name, qtype, kwargs = REPLIES[case]
    data = response(name, qtype, **kwargs)
    reply = scan(data)
    q = query(client_name(name), qtype, **client)
    out = render(q, reply, 0)
    assert DNSRecord.parse(out)  # dnslib reads it too
    got, upstream = summary(out), summary(data)
    assert got.id == q.data[0] << 8 | q.data[1]
    assert got.question == ((client_name(name) + ".", qtype, "IN"),)
    assert got.rcode == upstream.rcode == kwargs.get("rcode", 0)
    assert got.flags == expected_flags(q, struct.unpack_from("!H", data, 2)[0])
    assert got.edns == ((0, 1232, q.do, ()) if q.edns else None)
    got_records, upstream_records = got.without_ttls(), upstream.without_ttls()
    assert got_records.answer == upstream_records.answer
    assert got_records.authority == upstream_records.authority
    assert got_records.additional == upstream_records.additional
    assert sorted(got.ttls()) == sorted(ttl for _, ttl in reply.ttls)


class SaidTo(Said, total=False):
    """response()'s keywords and the type of the question answered."""

    qtype: str


@pytest.mark.parametrize(
    ("kwargs", "policy", "stored", "lifetime"),
    [
        ({"answer": ("www.example.org. 300 IN A 192.0.2.1",)}, POLICY, [300], 300),
        ({"answer": ("www.example.org. 5 IN A 192.0.2.1",)}, TtlPolicy(min_ttl=60), [60], 60),
        ({"answer": ("www.example.org. 100000 IN A 192.0.2.1",)}, POLICY, [86400], 86400),
        ({"answer": ("www.example.org. 700 IN A 192.0.2.1",)}, TtlPolicy(max_ttl=600),
         [600], 600),
        ({"answer": ("www.example.org. 0 IN A 192.0.2.1",)}, POLICY, [0], 0),
        ({"answer": ("www.example.org. 3600 IN CNAME a.example.org.",
                     "a.example.org. 60 IN A 192.0.2.1")}, POLICY, [3600, 60], 60),
        ({"answer": ("www.example.org. 300 IN A 192.0.2.1",), "authority": NS,
          "additional": GLUE}, POLICY, [300, 3600, 3600, 3600, 3600], 300),
        ({"answer": ("www.example.org. 300 IN A 192.0.2.1",), "opt": "last"}, POLICY,
         [300], 300),
        # RFC 2308: negative answers live min(SOA TTL, SOA minimum), capped by negative_max
        ({"rcode": constants.NXDOMAIN, "authority": (SOA_3600_300,)}, POLICY, [300], 300),
        ({"rcode": constants.NXDOMAIN, "authority": (SOA_100_300,)}, POLICY, [100], 100),
        ({"rcode": constants.NXDOMAIN, "authority": (SOA_DAY,)}, POLICY, [3600], 3600),
        ({"rcode": constants.NXDOMAIN, "authority": (SOA_DAY,)}, TtlPolicy(negative_max=60),
         [60], 60),
        ({"rcode": constants.NXDOMAIN, "authority": (SOA_3600_300,)}, TtlPolicy(min_ttl=900),
         [300], 300),  # min_ttl is for positive answers only
        ({"rcode": constants.NXDOMAIN,
          "answer": ("nope.example.org. 3600 IN CNAME gone.example.org.",),
          "authority": (SOA_3600_300,)}, POLICY, [300, 300], 300),
        ({"authority": (SOA_3600_300,)}, POLICY, [300], 300),  # NODATA
        ({"authority": (SOA_3600_300,), "opt": "first",
          "additional": ("ns.example.org. 3600 IN A 192.0.2.53",)}, POLICY, [300, 300], 300),
        ({"authority": NS}, POLICY, [0, 0], None),  # NODATA without SOA: not cached
        # RFC 2308 5: a CNAME chain that ends in nothing is NODATA for its end, negative too
        ({"answer": ("www.example.org. 3600 IN CNAME a.example.org.",),
          "authority": (SOA_3600_300,)}, POLICY, [300, 300], 300),
        ({"answer": ("www.example.org. 3600 IN CNAME a.example.org.",)}, POLICY, [0], None),
        ({"qtype": "CNAME", "answer": ("www.example.org. 3600 IN CNAME a.example.org.",)},
         POLICY, [3600], 3600),  # unless the chain is what was asked for
        ({"qtype": "ANY", "answer": ("www.example.org. 3600 IN CNAME a.example.org.",)},
         POLICY, [3600], 3600),
        # RFC 2181 8: a TTL with the top bit set counts as 0, in an SOA's numbers as well
        ({"answer": ("www.example.org. 2147483648 IN CNAME a.example.org.",
                     "a.example.org. 300 IN A 192.0.2.2")}, POLICY, [0, 300], 0),
        ({"rcode": constants.NXDOMAIN, "authority": (
            "example.org. 4294967295 IN SOA ns.example.org. h.example.org. 1 2 3 4 300",)},
         POLICY, [0], 0),
        ({"rcode": constants.NXDOMAIN}, POLICY, [], None),
        # RFC 9520: a failure is kept for servfail_ttl seconds (default 5), or not at all
        ({"rcode": constants.SERVFAIL}, POLICY, [], 5),
        ({"rcode": constants.SERVFAIL}, TtlPolicy(servfail_ttl=0), [], None),
        ({"rcode": constants.SERVFAIL, "authority": (SOA_3600_300,)}, POLICY, [5], 5),
        ({"rcode": constants.REFUSED}, POLICY, [], None),
        ({"rcode": constants.NOTIMP, "opt": "last"}, POLICY, [], None),
    ],
)
def test_ttl_policy(kwargs: SaidTo, policy: TtlPolicy, stored: list[int],
                    lifetime: int | None) -> None:
    reply = scan(response("www.example.org", **kwargs), policy)
    assert [ttl for _, ttl in reply.ttls] == stored
    assert reply.ttl == lifetime
    got = summary(render(query("www.example.org", transport="tcp"), reply, 0))
    assert sorted(got.ttls()) == sorted(stored)


COUNTDOWN: Said = {"answer": ("www.example.org. 3600 IN CNAME a.example.org.",
                        "a.example.org. 60 IN A 192.0.2.1"), "authority": NS}


@pytest.mark.parametrize(
    ("elapsed", "ttls"),
    [
        (0, [3600, 60, 3600, 3600]),
        (1, [3599, 59, 3599, 3599]),
        (59, [3541, 1, 3541, 3541]),
        (60, [3540, 0, 3540, 3540]),
        (61, [3539, 0, 3539, 3539]),
        (3600, [0, 0, 0, 0]),
        (10**6, [0, 0, 0, 0]),
    ],
)
@pytest.mark.parametrize("client", [{}, {"edns": True, "do": True}])
def test_render_counts_ttls_down(elapsed: int, ttls: list[int], client: Asked) -> None:
    reply = scan(response("www.example.org", **COUNTDOWN))
    before = reply.body
    got = summary(render(query("www.example.org", **client), reply, elapsed))
    rendered = {(name, rtype): ttl for name, ttl, _, rtype, _ in got.answer + got.authority}
    assert [rendered[("www.example.org.", "CNAME")], rendered[("a.example.org.", "A")],
            rendered[("example.org.", "NS")]] == ttls[:3]
    assert reply.body == before  # a cached reply is never changed by serving it


BIG: Said = {"answer": tuple(f"www.example.org. 300 IN A 192.0.2.{n}" for n in range(1, 41))}


@pytest.mark.parametrize(
    ("transport", "client", "truncated"),
    [
        ("udp", {}, True),  # 40 A records: about 700 bytes
        ("udp", {"edns": True, "udp": 512}, True),
        ("udp", {"edns": True, "udp": 100, "do": True}, True),
        ("udp", {"edns": True, "udp": 1232}, False),
        ("tcp", {}, False),
        ("tcp", {"edns": True, "udp": 512}, False),
    ],
)
def test_render_truncates_for_small_udp_buffers(transport: str, client: Shape,
                                                truncated: bool) -> None:
    reply = scan(response("www.example.org", **BIG))
    q = query("WWW.example.org", transport=transport, qid=99, **client)
    out = render(q, reply, 0)
    got = summary(out)
    assert got.id == 99 and got.question == (("WWW.example.org.", "A", "IN"),)
    assert got.edns == ((0, 1232, q.do, ()) if q.edns else None)
    if truncated:
        assert "TC" in got.flags and len(out) <= 512
        assert got.answer == got.authority == got.additional == ()
    else:
        assert "TC" not in got.flags and len(got.answer) == 40


@pytest.mark.parametrize(
    ("upstream_ad", "client", "ad"),
    [
        (True, {}, False),
        (True, {"ad": True}, True),
        (True, {"edns": True}, False),
        (True, {"edns": True, "do": True}, True),
        (True, {"edns": True, "do": True, "ad": True}, True),
        (False, {"ad": True}, False),
        (False, {"edns": True, "do": True}, False),
    ],
)
def test_render_keeps_ad_only_for_clients_that_asked(upstream_ad: bool, client: Asked,
                                                     ad: bool) -> None:
    reply = scan(response("www.example.org", answer=("www.example.org. 300 IN A 192.0.2.1",),
                          ad=upstream_ad, aa=True))
    got = summary(render(query("www.example.org", **client), reply, 0))
    assert ("AD" in got.flags) == ad
    assert "AA" not in got.flags  # a forwarder is never authoritative


def _opt() -> bytes:
    return wire.opt_record(False)


def _a(ttl: int = 60) -> bytes:
    return b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + bytes((192, 0, 2, 1))


QUESTION = b"\x03www\x07example\x03org\x00\x00\x01\x00\x01"


def _message(an: int, ns: int, ar: int, *records: bytes) -> bytes:
    return struct.pack("!HHHHHH", 1, 0x8180, 1, an, ns, ar) + QUESTION + b"".join(records)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_message(1, 0, 0), id="record missing"),
        pytest.param(_message(1, 0, 0, _a()[:-1]), id="rdata cut short"),
        pytest.param(_message(1, 0, 0, b"\xc0\x0c\x00\x01"), id="fixed part cut short"),
        pytest.param(_message(1, 0, 0, b"\x80" + _a()[2:]), id="bad label type"),
        pytest.param(_message(1, 0, 0, _opt()), id="OPT as the answer"),
        pytest.param(_message(2, 0, 0, _opt(), _a()), id="OPT in the answer, not last"),
        pytest.param(_message(1, 1, 0, _a(), _opt()), id="OPT in the authority"),
        pytest.param(_message(1, 0, 2, _a(), _opt(), _opt()), id="two OPT records"),
        pytest.param(_message(1, 0, 1, _a(), wire.opt_record(False, ext_rcode=1)),
                     id="extended rcode (BADCOOKIE, BADVERS...) that the OPT would take away"),
        pytest.param(_message(0, 1, 0, b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x0e\x10\x00\x00"),
                     id="SOA without data"),
        pytest.param(_message(0, 1, 0, b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x0e\x10\x00\x17"
                                 + b"\x00\x00\x00" + bytes(20)), id="SOA with a stray byte"),
        pytest.param(_message(2, 0, 0, b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x0e\x10\x00\x00",
                              _a()), id="CNAME without data (the next record is no target)"),
        pytest.param(_message(1, 0, 0, b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x0e\x10\x00\x04"
                                 + b"\x00\x00\x00\x00"), id="CNAME data longer than its name"),
        pytest.param(_message(1, 0, 2, _a(), _opt(), b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c"
                                                     b"\x00\x03\xc0\x00\x02"),
                     id="bad A rdata after OPT (slow path)"),
    ],
)
def test_scan_reply_rejects_malformed_replies(data: bytes) -> None:
    with pytest.raises((ValueError, IndexError, struct.error)):
        scan(data)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 4), st.integers(0, 4), st.integers(0, 4),
       st.binary(max_size=200))
def test_scan_reply_fails_cleanly_on_random_records(flags: int, an: int, ns: int, ar: int,
                                                    tail: bytes) -> None:
    data = struct.pack("!HHHHHH", 1, flags, 1, an, ns, ar) + QUESTION + tail
    try:
        reply = scan_reply(data, 12 + len(QUESTION), POLICY)
    except (ValueError, IndexError, struct.error):
        return
    assert_framed(render(query("www.example.org", transport="tcp", edns=True), reply, 5))


RECORD = st.sampled_from([_a(), _a(0), _opt(), _a()[:-2], b"\xc0\x0c\x00\x01", b"\x00"])


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.lists(RECORD, max_size=6))
def test_scan_reply_fails_cleanly_on_shuffled_records(an: int, ns: int, ar: int,
                                                      parts: list[bytes]) -> None:
    """Near-valid records, OPT anywhere: the slow path must fail as cleanly as the fast one."""
    data = _message(an, ns, ar, *parts)
    try:
        reply = scan_reply(data, 12 + len(QUESTION), POLICY)
    except (ValueError, IndexError, struct.error):
        return
    assert_framed(render(query("www.example.org", transport="tcp", edns=True), reply, 5))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, constants.MAX_TTL), min_size=1, max_size=6),
       st.integers(0, 100_000), st.integers(0, 100_000), st.booleans())
def test_scan_reply_bounds_every_ttl(ttls: list[int], low: int, high: int, opt: bool) -> None:
    """Whatever the TTLs, each stored one is the policy's bound of the upstream's, in the
    body as in the table, and a positive answer lives as long as the shortest (the scan
    rewrites TTLs only when one falls outside the bounds, so both ways are exercised)."""
    policy = TtlPolicy(min_ttl=min(low, high), max_ttl=max(low, high))
    records = [_a(ttl) for ttl in ttls] + ([_opt()] if opt else [])
    reply = scan_reply(_message(len(ttls), 0, int(opt), *records), 12 + len(QUESTION), policy)
    bounded = [min(max(ttl, policy.min_ttl), policy.max_ttl) for ttl in ttls]
    assert [ttl for _, ttl in reply.ttls] == bounded
    assert [struct.unpack_from("!I", reply.body, offset)[0] for offset, _ in reply.ttls] == bounded
    assert reply.ttl == min(bounded) and reply.ar == 0


def assert_framed(answer: bytes) -> None:
    """The header's counts describe exactly the records that follow, with one OPT at most,
    last: whatever an upstream sent, a client gets a message it can walk."""
    _, _, qd, an, ns, ar = struct.unpack_from("!HHHHHH", answer)
    pos = wire.skip_name(answer, 12) + 4
    types = []
    for _ in range(an + ns + ar):
        pos = wire.skip_name(answer, pos)
        rtype, _, _, rdlength = struct.unpack_from("!HHIH", answer, pos)
        types.append(rtype)
        pos += 10 + rdlength
    assert qd == 1 and pos == len(answer)
    # the client used EDNS
    assert constants.TYPE_OPT not in types[:-1] and types[-1:] == [constants.TYPE_OPT]


def test_scan_reply_of_dnslib_edns_reply_after_question_only() -> None:
    """An upstream answer with only an OPT record: nothing left to replay but the rcode."""
    record = DNSRecord.question("www.example.org").reply()
    record.add_ar(EDNS0(udp_len=4096))
    reply = scan(bytes(record.pack()))
    assert (reply.an, reply.ns, reply.ar, reply.body, reply.ttls) == (0, 0, 0, b"", ())


@pytest.mark.parametrize(
    ("case", "cnames"),
    [
        ("a", ()),
        ("cname-chain", (b"\x03cdn\x07example\x03net\x00",
                         b"\x04edge\x03cdn\x07example\x03net\x00")),
        ("nxdomain", ()),
        ("referral-like", ()),  # names in MX, NS and glue are not a chain
        ("opt-first", ()),
    ],
)
def test_scan_reply_reads_cname_targets(case: str, cnames: tuple[bytes, ...]) -> None:
    name, qtype, kwargs = REPLIES[case]
    assert scan(response(name, qtype, **kwargs)).cnames == cnames


@pytest.mark.parametrize(
    "answer",
    [
        ("WWW.example.org. 300 IN CNAME Tracker.Example.NET.",),
        ("www.example.org. 300 IN CNAME tracker.example.net.",  # after OPT-first repacking
         "tracker.example.net. 60 IN A 192.0.2.1"),
    ],
)
@pytest.mark.parametrize("opt", [None, "last", "first"])
def test_cname_targets_are_lowercase_and_uncompressed(answer: tuple[str, ...], opt) -> None:
    data = response("www.example.org", answer=answer, opt=opt,
                    additional=("ns.example.net. 60 IN A 192.0.2.53",))
    assert scan(data).cnames == (b"\x07tracker\x07example\x03net\x00",)


def test_failure_reply() -> None:
    assert failure(TtlPolicy(servfail_ttl=0)).ttl is None
    reply = failure(TtlPolicy(servfail_ttl=7))
    assert (reply.rcode, reply.ttl, reply.an, reply.body) == (constants.SERVFAIL, 7, 0, b"")
    got = summary(render(query("www.example.org", edns=True), reply, 3))
    assert got.rcode == constants.SERVFAIL and got.answer == () and got.edns == (0, 1232, False, ())


STALE_EDE = ((15, b"\x00\x03"),)  # RFC 8914 code 3, Stale Answer, no text


@pytest.mark.parametrize("case", ["a", "cname-chain", "nxdomain", "referral-like", "ad"])
@pytest.mark.parametrize("client", CLIENTS)
def test_render_stale_sets_every_ttl_and_says_stale(case: str, client: Asked) -> None:
    name, qtype, kwargs = REPLIES[case]
    data = response(name, qtype, **kwargs)
    reply = scan(data)
    before = reply.body
    q = query(client_name(name), qtype, **client)
    got = summary(render_stale(q, reply, 30))
    fresh = summary(render(q, reply, 0))
    edns: Edns | None = None
    if q.edns:
        assert fresh.edns is not None
        version, payload, do, _ = fresh.edns
        edns = (version, payload, do, STALE_EDE)
    assert got.without_ttls() == dataclasses.replace(fresh.without_ttls(), edns=edns)
    assert set(got.ttls()) <= {30}
    assert len(got.ttls()) == len(reply.ttls)
    assert reply.body == before


def test_render_stale_truncates_for_small_udp_buffers() -> None:
    reply = scan(response("www.example.org", **BIG))
    got = summary(render_stale(query("www.example.org"), reply, 30))
    assert "TC" in got.flags and got.answer == ()
