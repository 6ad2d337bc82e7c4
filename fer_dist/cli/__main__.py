"""`python -m fer_dist.cli` = `fer-dist`; also what `accelerate launch -m fer_dist.cli eval ...` runs."""

from fer_dist.cli import main

if __name__ == "__main__":
    main()
