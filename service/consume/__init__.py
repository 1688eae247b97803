"""The consumer process (`payhook consume`): dedupe, reconcile, store, publish settlements."""
