"""Development-only tools (the local broker, `make run`'s launcher): never in the wheel or image."""
