"""What a launch hands its ranks through the environment (set by `fer_dist.launch` and `fer-dist train`,
read by the ranks). No imports: the launcher reads these names without loading torch."""

# A folder the launcher makes: each rank writes its one-line error there as rank-<R>.json, the launcher
# prints the lowest rank's once. Without it (bare `accelerate launch`, one process) rank 0 prints it.
ERRORS_ENV = "FER_DIST_STATUS_DIR"
# A file holding the label pass `fer-dist train` made before the launch (`runset.save_checked`): the ranks
# take it where it was made over the very files they see (`runset.launch_checked`); the launcher removes it.
CHECKED_ENV = "FER_DIST_CHECKED_LABELS"
