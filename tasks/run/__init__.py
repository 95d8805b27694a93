"""The run engine: context, stage registry, batch execution, scheduling, leases, starting a run."""
