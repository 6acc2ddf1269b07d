"""Where webhooks may go: public addresses only, unless the operator allows a network.

Without this, anyone holding an admin key could point a webhook at 127.0.0.1, the cloud's
metadata address or an internal name, and read the attempt errors as a port scanner. A URL's
host is checked when the subscription is made (an IP literal) and again when each attempt is
sent (the name resolved then, and the connection made to the address that was checked, so a
name that changes its answer in between cannot move it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

ALLOWED_NETWORKS_SETTING = "ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS"

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class TargetNotAllowedError(ValueError):
    """The webhook's host is, or resolves to, an address webhooks may not reach."""


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (``127.0.0.0/8, 10.1.0.0/16``) as networks; empty for none."""
    return tuple(ip_network(part.strip()) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class TargetPolicy:
    """Public addresses only, plus the networks the operator allows."""

    allowed: tuple[Network, ...] = ()

    def permits(self, address: Address) -> bool:
        """Whether a webhook may connect to ``address``."""
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return True
        # Not global: loopback, private, link-local (the metadata services' 169.254.169.254),
        # unique-local (fd00:ec2::254), shared (100.64/10), unspecified, reserved.
        return address.is_global and not address.is_multicast

    def check_url(self, url: str) -> None:
        """Refuse a URL whose host is an IP literal outside what ``permits``; names pass here
        and are checked on every attempt."""
        host = urlsplit(url).hostname or ""
        try:
            address = ip_address(host)
        except ValueError:
            return
        if not self.permits(address):
            raise TargetNotAllowedError(_refusal(host))

    def resolve(self, host: str, port: int) -> Address:
        """The address to connect to for ``host``: every address it resolves to must be
        permitted (a name that also answers 127.0.0.1 is refused, whichever comes first)."""
        try:
            address = ip_address(host)
        except ValueError:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        else:
            addresses = [address]
        if not addresses or not all(self.permits(each) for each in addresses):
            raise TargetNotAllowedError(_refusal(host))
        return addresses[0]


def _refusal(host: str) -> str:
    return (
        f"webhook host {host!r} is a loopback, private, link-local, unique-local, shared, "
        f"multicast or unspecified address; webhooks go to public addresses unless "
        f"{ALLOWED_NETWORKS_SETTING} lists the network (comma-separated CIDRs, "
        "e.g. 127.0.0.0/8 for a receiver on this machine)"
    )
