"""The write side of orderledger: the Order aggregate, its rules and the application service."""
