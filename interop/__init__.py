"""Interoperability tests against real Synapse processes, on 127.0.0.1 only.

Run them with a Synapse virtualenv made by ``.ci/install_synapse.sh``::

    KEYRING_SYNAPSE_PYTHON="$(bash .ci/install_synapse.sh | tail -n 1)" \\
        .venv/bin/python -m twisted.trial interop

Without ``KEYRING_SYNAPSE_PYTHON`` the tests are skipped, except under CI (``CI=true``)
where that is a failure. :mod:`interop.harness` starts and stops the processes.
"""
