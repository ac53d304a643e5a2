"""Whether a file can be read or a folder written, in the words start-up problems use.

Each function returns why not (a short phrase naming the path), or None::

    >>> file_problem("/nonexistent/cert.pem")
    'file not found: /nonexistent/cert.pem'
"""

import os
import tempfile
from typing import Optional


def file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a file, or None.

    Example:
        >>> file_problem("/nonexistent/cert.pem")
        'file not found: /nonexistent/cert.pem'
        >>> file_problem("/")
        'not a file: /'
    """
    if os.path.islink(path) and not os.path.exists(path):
        return dangling_symlink_problem(path)
    if not os.path.exists(path):
        return "file not found: %s" % (path,)
    if os.path.isdir(path):
        return "not a file: %s" % (path,)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return "file not readable: %s (%s)" % (path, e.strerror)
    return None


def dangling_symlink_problem(path: str) -> str:
    """The words for a symbolic link ``path`` whose target does not exist.

    Example:
        >>> import os, tempfile
        >>> link = os.path.join(tempfile.mkdtemp(), "k.key")
        >>> os.symlink("/nonexistent/k.key", link)
        >>> dangling_symlink_problem(link) == "dangling symlink: %s (-> /nonexistent/k.key)" % link
        True
    """
    try:
        target = os.readlink(path)
    except OSError:
        return "dangling symlink: %s" % (path,)
    return "dangling symlink: %s (-> %s)" % (path, target)


def folder_problem(folder: str, writable: bool) -> Optional[str]:
    """Why ``folder`` is not a folder (that we may write in, if ``writable``), or None.

    Writability is probed by creating and removing an empty file.

    Example:
        >>> folder_problem("/nonexistent", writable=True)
        'folder not found: /nonexistent'
    """
    if not os.path.exists(folder):
        return "folder not found: %s" % (folder,)
    if not os.path.isdir(folder):
        return "not a folder: %s" % (folder,)
    if writable:
        try:
            fd, probe = tempfile.mkstemp(prefix=".keyring-module-check-", dir=folder)
        except OSError as e:
            return "folder not writable: %s (%s)" % (folder, e.strerror)
        os.close(fd)
        os.unlink(probe)
    return None


def folder_of(path: str) -> str:
    """The folder a file ``path`` is (or would be) in.

    Example:
        >>> folder_of("/var/lib/keyring/keyring.db")
        '/var/lib/keyring'
    """
    return os.path.dirname(os.path.abspath(path))
