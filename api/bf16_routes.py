"""Queue knobs of the BF16 workers (main_bf16.py).

By default they come from the environment: FLUX_MAX_CONCURRENT (2) and FLUX_MAX_QUEUE_SIZE (100).
To pin them in code instead, edit the QueueManager(...) call below, for example:
    queue_manager = QueueManager(max_concurrent=3, max_queue_size=200)
"""
from api.queue import QueueManager


def make_queue_manager(settings, engine, store, **options) -> QueueManager:
    queue_manager = QueueManager(max_concurrent=settings.max_concurrent, max_queue_size=settings.max_queue_size)
    queue_manager.attach(engine, store, **options)
    return queue_manager
