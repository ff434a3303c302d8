"""Task definitions, one module per domain; importing this registers them all
(in our registry, `tasks.common.TASKS`, and as seqio tasks)."""
from tasks import apps, arith, common, gsm8k, humaneval, math  # noqa: F401
from tasks.common import Task, get, set_data_dir  # noqa: F401
