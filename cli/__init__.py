"""The `cosy` command."""
