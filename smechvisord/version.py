"""The one place the version lives (pyproject reads it, /api/health reports it)."""

VERSION = "0.1.0"
