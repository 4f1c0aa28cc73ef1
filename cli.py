"""Run featpipe from a checkout without installing it: `python cli.py extract ...`."""
from featpipe.cli import main

if __name__ == "__main__":
    main()
