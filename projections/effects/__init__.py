"""Side effects: the transactional outbox, its dispatcher, webhooks and email."""
