"""orderledger's tests: unit, integration (real SQLite and PostgreSQL) and end to end."""

LOCAL_RECEIVERS = "127.0.0.0/8"
"""Where the tests' webhook receivers listen: ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS for them."""
