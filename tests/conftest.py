"""Shared fixtures live in one module per area, registered here."""

pytest_plugins = [
    "tests.fixtures_kafka",
    "tests.fixtures_app",
    "tests.fixtures_postgres",
    "tests.fixtures_monitoring",
    "tests.fixtures_consume",
    "tests.fixtures_store",
]
