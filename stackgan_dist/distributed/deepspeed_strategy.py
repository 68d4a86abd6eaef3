"""The old name of ``deepspeed.py``, kept only for config.py's ``validate_settings`` import until config.py
stops importing distributed/ (then this file goes)."""
from .deepspeed import validate_settings  # noqa: F401
