"""How a batch is cut into chunks for worker processes: shrinking chunks, so that the
workers finish together.

With chunks of one size, the batch ends when the slowest worker finishes its last
chunk: on a machine where the reactor's own work and other programs take the cores
in turns, one worker can fall a whole chunk behind, and the others then wait for it
(a tenth of a second for 1,250 events, a tenth of the batch). So each chunk is a share
of what is left, ``remaining / (2 * workers)``: big while there is much to do, small
at the end, where they even out what the workers have done. The first chunks are
smaller too, so that every worker starts early instead of waiting while the reactor
prepares one big chunk after another::

    >>> sizes(shrinking_chunks(10_000, workers=2, smallest=100, largest=10_000))
    [625, 625, 2188, 1641, 1231, 923, 692, 519, 389, 292, 219, 164, 123, 100, 100, 100, 69]

Each chunk is at least ``smallest`` events (a chunk's round trip to a worker costs
about as much as checking a few events) but the last, and at most ``largest``.
"""

#: A chunk's events: ``(start, end)`` indexes into the batch.
Bounds = tuple[int, int]


def shrinking_chunks(total: int, workers: int, smallest: int, largest: int) -> list[Bounds]:
    """Cut ``total`` events into consecutive chunks for ``workers`` processes.

    Args:
        total: events in the batch.
        workers: the processes sharing them.
        smallest: the fewest events a chunk holds (the last may hold fewer).
        largest: the most events a chunk holds.

    Returns:
        ``(start, end)`` of each chunk, in order, covering ``range(total)``.

    Raises:
        ValueError: ``workers``, ``smallest`` or ``largest`` below 1, or ``smallest``
            above ``largest``.

    Example:
        >>> shrinking_chunks(250, workers=2, smallest=100, largest=1000)
        [(0, 100), (100, 200), (200, 250)]
    """
    if min(workers, smallest, largest) < 1 or smallest > largest:
        raise ValueError("need 1 <= smallest <= largest and workers >= 1")
    # Every worker's first chunk: a quarter of an even share, so all start early.
    first = min(largest, max(smallest, -(-total // (8 * workers))))
    chunks: list[Bounds] = []
    start = 0
    while start < total:
        if len(chunks) < workers:
            size = first
        else:
            remaining = total - start
            size = min(largest, max(smallest, -(-remaining // (2 * workers))))
        end = min(total, start + size)
        chunks.append((start, end))
        start = end
    return chunks


def sizes(chunks: list[Bounds]) -> list[int]:
    """The number of events in each chunk.

    Example:
        >>> sizes([(0, 100), (100, 150)])
        [100, 50]
    """
    return [end - start for start, end in chunks]
