"""Environments: packages and images built once, cached, and shared read-only by every run."""
