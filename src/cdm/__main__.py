"""`python -m cdm` is the `cdm` command."""

from .app.cli import app

app()
