"""A run's bookkeeping, shared by training and inference (no model code).

files     the workdir's file names (once), config.json, metrics.jsonl, train_result.json
lock      one writer per workdir (workdir/LOCK)
status    how a run ends: statuses, exit codes, RunError
writers   metric writer: log lines and TensorBoard events (tensorboardX)
progress  progress log lines with rate and ETA, by time
console   what commands print: logging set-up, library noise filtered
agreement one decision for all processes: stop requests and errors agreed at fixed points
hosts     --distributed launch arguments, and the pre-flight check of paths on every host
"""
