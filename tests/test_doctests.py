"""The examples in the package's docstrings run as tests, so they stay true.

One test per module (plain test methods, so that ``trial -j`` can run them too).
"""

import doctest
import importlib
import io
import pkgutil

from twisted.trial.unittest import SynchronousTestCase

import keyring_module

MODULES = [
    module.name
    for module in pkgutil.walk_packages(keyring_module.__path__, "keyring_module.")
    if not module.name.endswith("__main__")  # importing it would start the CLI
]


class DocstringExampleTests(SynchronousTestCase):
    def test_every_module_example_holds(self) -> None:
        """Every docstring example of every module gives the output it shows."""
        tried = 0
        for name in MODULES:
            with self.subTest(module=name):
                out = io.StringIO()
                runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
                for test in doctest.DocTestFinder().find(importlib.import_module(name)):
                    runner.run(test, out=out.write)
                results = runner.summarize(verbose=False)
                tried += results.attempted
                self.assertEqual(results.failed, 0, out.getvalue())
        # The examples exist (and so the finder looked in the right place).
        self.assertGreater(tried, 20)
