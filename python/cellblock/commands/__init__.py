"""Subcommands of the `cellblock` CLI, one module each."""
