"""``generate-key`` run as root (``sudo``) leaves a key file the service user can read:
the new file (mode 0600) gets the owner and group of the current key file, or else of
its folder. Run by anyone else, the file is that user's own.

These tests chown files to unused ids (65534 and around) when they run as root, as they
do in CI; run by another user they check the file is left theirs."""

import contextlib
import io
import os

import yaml
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.cli import main
from keyring_module.signing import write_new_signing_key


def run_cli(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


class GenerateKeyOwnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.root = os.geteuid() == 0

    def owner(self, path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_uid, st.st_gid

    def test_owner_of_the_folder(self) -> None:
        """Without --config: the folder's owner and group."""
        folder = os.path.join(self.directory, "lib")
        os.makedirs(folder)
        if self.root:
            os.chown(folder, 65534, 65533)
        output = os.path.join(folder, "notary.signing.key")
        self.assertEqual(run_cli(["generate-key", "--output", output]), 0)
        self.assertEqual(
            self.owner(output), (65534, 65533) if self.root else (os.geteuid(), os.getegid())
        )
        self.assertEqual(os.stat(output).st_mode & 0o777, 0o600)

    def test_owner_of_the_current_key(self) -> None:
        """With --config and a current key file: that file's owner and group, even in a
        folder owned by someone else."""
        current = os.path.join(self.directory, "notary.signing.key")
        write_new_signing_key(current)
        if self.root:
            os.chown(current, 65532, 65531)
        config = os.path.join(self.directory, "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(
                {
                    "server_name": "notary.example.org",
                    "signing_key_path": current,
                    "listeners": [{"port": 8080}],
                },
                f,
            )
        output = current + ".new"
        self.assertEqual(run_cli(["generate-key", "--config", config, "--output", output]), 0)
        self.assertEqual(
            self.owner(output), (65532, 65531) if self.root else (os.geteuid(), os.getegid())
        )
