"""Timing scripts (`python -m benchmarks.<script>` from the repository root) and their helpers.

Helpers: `timing` (medians, interleaved rounds), `flops` (model and traced FLOPs), `hardware` (peaks,
memory, the torch device), `configs` (cases, configs, batches), `output` (environment, tables, JSON),
`flags` (the flags of the step benchmarks), `compiled_step` (the project's compiled train step),
`input_rate` (the input pipeline's images/s on a fake ADE20K).
"""

import os

# Both frameworks may share one accelerator in a run: JAX takes memory as it needs it instead of
# reserving 75% of the device up front (steady-state speed is the same; set the variable to override).
# Set on import of the package, so before any script or helper starts a JAX backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
