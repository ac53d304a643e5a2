"""``python -m keyring_module serve --config sample_config.yaml``."""

from keyring_module.cli import console_main

console_main()
