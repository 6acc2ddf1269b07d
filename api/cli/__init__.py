"""The orderledger command line: one module per command group."""
