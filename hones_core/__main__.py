import sys

from .cli import main
from .errors import HonesError

try:
    code = main()
except HonesError as err:      # refused on purpose: the message says what to change, no traceback
    print(f"python -m hones_core: {err}", file=sys.stderr)
    code = 2
raise SystemExit(code)
