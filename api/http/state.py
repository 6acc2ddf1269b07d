"""What the app holds for its lifetime on ``app.state``, read from a request."""

from __future__ import annotations

from typing import Generic, TypeVar, cast

from starlette.requests import Request

T = TypeVar("T")


class Held(Generic[T]):
    """One thing the app opens at start-up and keeps on ``app.state`` under ``attribute``."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def of(self, request: Request) -> T:
        """The one the app serving this request holds."""
        return cast(T, getattr(request.app.state, self.attribute))

    async def dependency(self, request: Request) -> T:
        """``of`` as a FastAPI dependency: async, since a plain def one would cost a
        thread-pool hand-off per request."""
        return self.of(request)
