"""Shell: one run. The command line, the output folder, checkpoints, progress, several processes, the report."""
