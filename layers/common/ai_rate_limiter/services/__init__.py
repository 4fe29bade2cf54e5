"""Use cases: each takes the container and plain data, returns plain data."""
