"""Moved to `fer-dist experiment run` (fer_dist/experiments/run.py); kept for the notes that name it."""
from fer_dist.cli import app

app(["experiment", "run", *__import__("sys").argv[1:]], prog_name="fer-dist experiment run")
