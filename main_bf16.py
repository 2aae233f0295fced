"""Worker entry point, precision bf16: `BF16_API_PORT=8000 python main_bf16.py` (see api/settings.py)."""
import sys

from api.server import run

if __name__ == "__main__":
    sys.exit(run("bf16"))
