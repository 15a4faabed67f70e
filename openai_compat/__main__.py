"""`python -m openai_compat [flags]` is `lightgate serve [flags]`."""

import sys

from openai_compat.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
