"""Queue knobs of the FP8 workers (main_fp8.py): the BF16 ones, so edit api/bf16_routes.py
(FLUX_MAX_CONCURRENT / FLUX_MAX_QUEUE_SIZE still apply)."""
from api.bf16_routes import make_queue_manager

__all__ = ["make_queue_manager"]
