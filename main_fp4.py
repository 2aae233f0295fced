"""Worker entry point, precision fp4: `FP4_API_PORT=8000 python main_fp4.py` (see api/settings.py)."""
import sys

from api.server import run

if __name__ == "__main__":
    sys.exit(run("fp4"))
