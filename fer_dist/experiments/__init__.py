"""Experiments (`fer-dist experiment`): an experiment's arms x seeds trained, tested and recorded (run.py,
measure.py, records.py), its definition (spec.py), SLURM job arrays of its tasks (submit.py), and the
results page, pictures and README block made from the records (publish.py, report.py, stats.py,
figures.py). Modules import torch and the trainer only where they train or test."""
