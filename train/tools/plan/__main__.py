import sys

from mimo.train.tools.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
