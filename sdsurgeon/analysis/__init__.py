"""Read-only analysis of captured graphs: residual sites, survival-probability schedules, the plan record."""
