"""orderledger's tests: unit, integration (real SQLite and PostgreSQL) and end to end."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository: the working directory and PYTHONPATH of the processes tests start."""

LOCAL_RECEIVERS = "127.0.0.0/8"
"""Where the tests' webhook receivers listen: ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS for them."""

MASTER_KEY = "7a" * 32
"""ORDERLEDGER_MASTER_KEY of every test and the processes they start (tests/conftest.py)."""
