"""fer-dist: weakly supervised facial expression recognition (Happy, Dantcheva & Bremond, 2019) at scale."""

__version__ = "0.1.0"
