"""The HTTP API and the live wallboard (``medhotline api``; docs/api.md)."""

from medhotline.api.app import ApiSettings, create_app

__all__ = ["ApiSettings", "create_app"]
