"""Tools run from the repository root as modules (`python -m tools.<name>`): the AOT memory planner
(`scale`), the platform exports (`export`), the first run on an accelerator (`accelerator_check`) and
the objective's walk-through (`demo_objective`)."""
