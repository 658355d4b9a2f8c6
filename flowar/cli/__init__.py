"""Command-line interface (imports the library, never the reverse)."""
