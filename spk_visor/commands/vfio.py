"""Placeholder while the group is written; replaced in this change."""

import typer

app = typer.Typer(help="(in progress)")
