"""Side-effect tests: the outbox, its dispatcher, signed webhooks and email."""
