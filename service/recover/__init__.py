"""The recovery process (`payhook recover`): read the providers' APIs, publish what the
store has not seen."""
