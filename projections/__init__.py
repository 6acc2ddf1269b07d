"""Read models kept up to date from the event store, exactly once per position."""
