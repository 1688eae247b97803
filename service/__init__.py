"""payhook: webhook ingestion and reconciliation for crypto payment providers."""

__version__ = "0.1.0"
