"""The local stack behind ``ferry up`` / ``ferry down`` / ``ferry status``.

Everything else in this package is private; use::

    info = await Stack(load_config()).up(progress=print)
    ...
    await Stack(load_config()).down()
"""

from tools.stack.errors import StackError
from tools.stack.ferry_services import ServiceSpec
from tools.stack.stack import ComponentStatus, Stack, StackInfo

__all__ = ["ComponentStatus", "ServiceSpec", "Stack", "StackError", "StackInfo"]
