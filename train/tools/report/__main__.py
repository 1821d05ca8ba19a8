import sys

from mimo.train.tools.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
