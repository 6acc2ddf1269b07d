"""Where webhooks may go: the address rule, on its own."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from pydantic import ValidationError

from api.settings import Settings
from projections.effects.targets import (
    ALLOWED_NETWORKS_SETTING,
    TargetNotAllowedError,
    TargetPolicy,
    parse_networks,
)

REFUSED = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "IPv6 loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.10": "private",
    "169.254.169.254": "cloud metadata (link-local)",
    "fd00:ec2::254": "cloud metadata (unique-local)",
    "fe80::1": "IPv6 link-local",
    "fc00::1": "unique-local",
    "100.64.0.1": "shared address space",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "IPv6 multicast",
    "0.0.0.0": "unspecified",
    "::": "IPv6 unspecified",
    "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:169.254.169.254": "IPv4-mapped metadata",
    "240.0.0.1": "reserved",
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888"]


class TestTheAddressRule:
    @pytest.mark.parametrize("address", list(REFUSED), ids=list(REFUSED.values()))
    def test_non_public_addresses_are_refused(self, address: str) -> None:
        assert not TargetPolicy().permits(ip_address(address))

    @pytest.mark.parametrize("address", PUBLIC)
    def test_public_addresses_are_permitted(self, address: str) -> None:
        assert TargetPolicy().permits(ip_address(address))

    def test_an_allowed_network_opens_exactly_that_network(self) -> None:
        policy = TargetPolicy(parse_networks("127.0.0.0/8, 10.1.0.0/16"))
        assert policy.permits(ip_address("127.0.0.1"))
        assert policy.permits(ip_address("::ffff:127.0.0.1"))
        assert policy.permits(ip_address("10.1.200.3"))
        assert not policy.permits(ip_address("10.2.0.1"))
        assert not policy.permits(ip_address("169.254.169.254"))

    def test_a_literal_is_refused_with_the_setting_named(self) -> None:
        with pytest.raises(TargetNotAllowedError, match=ALLOWED_NETWORKS_SETTING):
            TargetPolicy().check_url("http://[::ffff:7f00:1]:9000/hooks")
        TargetPolicy().check_url("https://hooks.example.com/in")  # names wait for sending

    def test_a_name_is_refused_when_it_resolves_to_a_refused_address(self) -> None:
        with pytest.raises(TargetNotAllowedError, match="'localhost'"):
            TargetPolicy().resolve("localhost", 80)
        assert (
            TargetPolicy(parse_networks("127.0.0.0/8, ::1/128"))
            .resolve("localhost", 80)
            .is_loopback
        )

    def test_a_malformed_network_is_refused_when_settings_load(self) -> None:
        with pytest.raises(ValidationError, match=r"webhook_allowed_networks[\s\S]*10\.0\.0\.0/33"):
            Settings(webhook_allowed_networks="127.0.0.0/8, 10.0.0.0/33")
