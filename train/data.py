"""`python -m train.data prepare|verify`: prepare a text corpus for training (see tasks/text.py)."""

import sys

from tasks.text import main

if __name__ == "__main__":
  sys.exit(main())
