"""`python -m trainer`: see trainer.job."""

import sys

from trainer.job import main

if __name__ == "__main__":
    sys.exit(main())
