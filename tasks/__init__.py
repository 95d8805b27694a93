"""Pipeline stages: one module per stage, a pure function over typed records plus a thin Prefect task."""
