"""What the subcommands do beyond parsing: diagnose, demo, reference (``cli`` parses and dispatches)."""
