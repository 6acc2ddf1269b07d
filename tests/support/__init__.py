"""Helpers shared by the tests, each written once."""
