"""Command line: argument parsing and exit codes, over the application layer."""
