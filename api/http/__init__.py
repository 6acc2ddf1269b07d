"""The HTTP API: the app, its dependencies, authorization, problems and routes."""
