"""Moved to `fer-dist experiment report` (fer_dist/experiments/publish.py); kept for notes naming it."""
from fer_dist.cli import app

app(["experiment", "report", *__import__("sys").argv[1:]], prog_name="fer-dist experiment report")
