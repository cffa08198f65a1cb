"""The layers under their old module name: everything lives in ``fastconv.nn`` now."""

from .nn import *  # noqa: F401,F403
from .nn import __all__  # noqa: F401
