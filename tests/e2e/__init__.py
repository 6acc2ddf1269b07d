"""End-to-end tests: real `orderledger serve` processes driven over TCP on loopback."""
