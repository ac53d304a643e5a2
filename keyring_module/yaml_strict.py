"""YAML config files read strictly: a key set twice in one mapping is an error.

PyYAML keeps the last of repeated keys without a word, so a setting pasted above the
same setting further down (``old_signing_keys:`` over the sample's
``old_signing_keys: {}``) would be silently undone. :func:`load_yaml_strict` reads like
``yaml.safe_load`` but refuses that, at any depth, naming the key and both lines::

    >>> load_yaml_strict("database:\\n  path: a.db\\n  path: b.db\\n", "config.yaml")
    Traceback (most recent call last):
    ...
    keyring_module.errors.ConfigError: database.path: set twice (lines 2 and 3 of config.yaml)
    >>> load_yaml_strict("a: 1\\nb: {c: 2}\\n", "config.yaml")
    {'a': 1, 'b': {'c': 2}}

Keys brought in by a merge (``<<: *defaults``) may be overridden, as YAML intends.
"""

from typing import IO, Any, Union

import yaml

from keyring_module.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


def load_yaml_strict(stream: Union[str, bytes, IO[str], IO[bytes]], name: str) -> Any:
    """Parse one YAML document like ``yaml.safe_load``, refusing repeated keys.

    Args:
        stream: the YAML text or an open file.
        name: the file's name, for the message.

    Raises:
        yaml.YAMLError: not valid YAML.
        ConfigError: a mapping sets a key twice; ``path`` names the key.
    """
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_repeated_keys(node, (), name, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_repeated_keys(node: yaml.Node, path: tuple[str, ...], name: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _check_repeated_keys(value_node, path, name, seen)
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise ConfigError(
                        "set twice (lines %d and %d of %s)" % (first_line[key], line, name),
                        path + (key,),
                    )
                first_line[key] = line
            _check_repeated_keys(value_node, path + (key or "?",), name, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_repeated_keys(item, path + (str(index),), name, seen)
