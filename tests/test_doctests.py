"""The examples in the package's docstrings run as tests, so they stay true.

trial collects the doctests of every module listed in ``__doctests__``.
"""

import pkgutil

import keyring_module

__doctests__ = [
    module.name
    for module in pkgutil.walk_packages(keyring_module.__path__, "keyring_module.")
    if not module.name.endswith("__main__")  # running it would start the CLI
]
