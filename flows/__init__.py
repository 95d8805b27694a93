"""Prefect flows, their parameters and the `reltag` command line."""
