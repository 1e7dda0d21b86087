"""The application's state, typed: what the lifespan creates and the routes use, in one dataclass
kept at ``app.state.velo`` instead of loose attributes on Starlette's untyped ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module is imported by the error handlers, below everything
    from velo_proxy.auth import Authenticator
    from velo_proxy.engine import ChatEngine
    from velo_proxy.metrics import Metrics
    from velo_proxy.services import Services
    from velo_proxy.settings import Settings


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    metrics: Metrics
    auth: Authenticator
    services: Services
    engine: ChatEngine


def find_state(app: Any) -> AppState | None:
    """The state of a running app; None before its lifespan started it, after it stopped, or for a foreign app."""
    return getattr(getattr(app, "state", None), "velo", None)


def app_state(app: Any) -> AppState:
    state = find_state(app)
    if state is None:
        raise RuntimeError("the VELO app has not started: its lifespan did not run")
    return state
