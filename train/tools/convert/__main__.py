import sys

from mimo.train.tools.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
