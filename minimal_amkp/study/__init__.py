"""Shell: measurements of whole runs. The Tables 1-3 reproduction over seeds, and the SIGKILL resume check."""
