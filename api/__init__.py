"""The outside of orderledger: settings, the HTTP API and the command line."""
