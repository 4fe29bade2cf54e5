"""The egress guard's rules, without a socket: address kinds in every spelling, the allowlist,
schemes, and the registration check on a resolver replaced by a table."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from ai_rate_limiter.adapters import egress
from ai_rate_limiter.adapters.egress import Refused, allowlist, check_destination, kind, literal, screen
from ai_rate_limiter.errors import ProviderRejected, ValidationFailed

METADATA = ipaddress.IPv4Address("169.254.169.254")


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names resolve from this table only; any other name does not resolve."""
    table: dict[str, list[str]] = {}

    def lookup(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(f"{host}: not in the test's table")
        return table[host]

    monkeypatch.setattr(egress, "lookup", lookup)
    return table


@pytest.mark.parametrize(
    "spelling",
    [
        "169.254.169.254",
        "2852039166",  # decimal
        "0xa9fea9fe",  # hex
        "0251.0376.0251.0376",  # octal
        "0xa9.0xfe.0xa9.0xfe",
        "169.254.43518",  # the last two parts as one
        "[::ffff:169.254.169.254]",  # IPv4-mapped IPv6
        "::ffff:a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",  # NAT64
        "2002:a9fe:a9fe::1",  # 6to4
    ],
)
def test_the_metadata_address_is_refused_in_every_spelling(spelling: str) -> None:
    ip = literal(spelling)
    assert ip is not None
    assert kind(ip) is not None and "link-local" in str(kind(ip))
    if ip.version == 4:
        assert ip == METADATA
    with pytest.raises(Refused, match="link-local"):
        egress.vetted(spelling.strip("[]"), 80)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.0.0.5", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.0.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("100.127.255.254", "a shared (CGNAT) address"),
        ("fc00::1", "a unique-local address"),
        ("fd12:3456::1", "a unique-local address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.10", "a special-use address"),  # documentation
        ("::ffff:10.0.0.5", "a private address (it embeds 10.0.0.5)"),
        ("::ffff:127.0.0.1", "a loopback address (it embeds 127.0.0.1)"),
        ("64:ff9b::7f00:1", "a loopback address (it embeds 127.0.0.1)"),
    ],
)
def test_each_kind_of_internal_address_is_named(address: str, expected: str) -> None:
    assert kind(ipaddress.ip_address(address)) == expected


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.0", "172.32.0.1", "2606:4700::1111",
     "::ffff:8.8.8.8", "64:ff9b::808:808"],
)  # fmt: skip
def test_public_addresses_pass(address: str) -> None:
    assert kind(ipaddress.ip_address(address)) is None


def test_a_name_is_not_a_literal_and_junk_after_an_address_is_no_address() -> None:
    assert literal("api.openai.com") is None
    assert literal("1.2.3.4 x") is None
    assert literal("1.2.3.4.5") is None
    assert literal("0x1g") is None


def test_the_refusal_says_what_the_address_is() -> None:
    with pytest.raises(Refused, match=r"^10\.0\.0\.5 is a private address$"):
        egress.vetted("10.0.0.5", 443)
    with pytest.raises(Refused, match=r"^2852039166 is 169\.254\.169\.254, a link-local address$"):
        egress.vetted("2852039166", 443)


def test_every_address_of_a_name_is_checked(no_dns: dict[str, list[str]]) -> None:
    no_dns["mixed.test"] = ["93.184.216.34", "10.0.0.5"]
    no_dns["public.test"] = ["93.184.216.34", "2606:2800:220:1::1"]
    with pytest.raises(Refused, match=r"^mixed\.test resolves to 10\.0\.0\.5, a private address$"):
        egress.vetted("mixed.test", 443)
    assert [str(ip) for ip in egress.vetted("public.test", 443)] == ["93.184.216.34", "2606:2800:220:1::1"]


def test_the_allowlist_is_host_port_entries_lower_cased() -> None:
    assert allowlist("") == frozenset()
    assert allowlist(" LocalHost:8600 , [::1]:80,,127.0.0.1:9 ") == {
        ("localhost", 8600),
        ("::1", 80),
        ("127.0.0.1", 9),
    }
    for bad in ("localhost", "localhost:", ":80", "::1:80", "host:0", "host:65536", "host:http", "host:٨٠"):
        with pytest.raises(ValueError, match="EGRESS_ALLOW"):
            allowlist(bad)


def test_an_entry_is_matched_on_host_and_port_as_written() -> None:
    allow = allowlist("localhost:8600")
    assert screen("http", "localhost", 8600, allow) == 8600
    assert screen("HTTP", "LOCALHOST", 8600, allow) == 8600
    with pytest.raises(Refused, match="loopback"):
        screen("http", "127.0.0.1", 8600, allow)  # the same machine, another entry
    with pytest.raises(Refused, match="not https"):
        screen("http", "localhost", 8601, allow)
    assert screen("http", "10.0.0.5", None, allowlist("10.0.0.5:80")) == 80  # the default port
    assert screen("https", "10.0.0.5", 443, allowlist("10.0.0.5:443")) == 443


def test_only_https_leaves_without_an_entry() -> None:
    assert screen("https", "api.openai.com", None, frozenset()) == 443
    for scheme in ("http", "ftp", "file", "gopher", "ws"):
        with pytest.raises(Refused):
            screen(scheme, "api.openai.com", None, frozenset())
    with pytest.raises(Refused, match="not https"):
        screen("ftp", "localhost", 21, allowlist("localhost:21"))  # an entry allows http, no more


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5",
        "https://10.0.0.5/v1",
        "http://169.254.169.254/latest/meta-data",
        "https://2852039166/",
        "https://0xa9fea9fe/",
        "https://0251.0376.0251.0376/",
        "https://[::ffff:169.254.169.254]/",
        "http://127.0.0.1:15672",
        "https://[fd00::1]:8443/",
        "https://100.64.0.1/",
    ],
)
def test_registration_refuses_internal_urls_naming_the_field(url: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        check_destination(url, "", "config.endpoint")
    [problem] = refused.value.extra["errors"]
    assert problem["field"] == "config.endpoint"
    assert problem["message"].startswith("egress refused: ")
    assert refused.value.status == 422


def test_registration_resolves_names(no_dns: dict[str, list[str]]) -> None:
    no_dns["api.example.com"] = ["93.184.216.34"]
    no_dns["internal.example.com"] = ["192.168.0.7"]
    check_destination("https://api.example.com/v1", "", "config.endpoint")
    with pytest.raises(ValidationFailed, match=r"internal\.example\.com resolves to 192\.168\.0\.7"):
        check_destination("https://internal.example.com", "", "webhook_url")
    with pytest.raises(ValidationFailed, match="does not resolve"):
        check_destination("https://nowhere.example.com", "", "webhook_url")
    with pytest.raises(ValidationFailed, match="not https"):
        check_destination("http://api.example.com", "", "webhook_url")


def test_registration_lets_allowed_entries_through_without_a_lookup() -> None:
    check_destination("http://127.0.0.1:8600/v1", "127.0.0.1:8600", "config.endpoint")
    check_destination("http://fake.internal:8600", "fake.internal:8600", "config.endpoint")  # no DNS
    with pytest.raises(ValidationFailed, match="loopback"):
        check_destination("http://127.0.0.1:8600", "localhost:8600", "config.endpoint")


def test_a_refused_provider_request_is_a_permanent_provider_error() -> None:
    refused = egress.EgressRefused("egress refused: 10.0.0.5 is a private address")
    assert isinstance(refused, ProviderRejected) and not refused.retryable
    assert refused.detail == str(refused) == "egress refused: 10.0.0.5 is a private address"
