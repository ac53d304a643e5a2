"""How batches are cut for worker processes (keyring_module.keyring.chunking)."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.keyring.chunking import shrinking_chunks, sizes


class ShrinkingChunksTests(SynchronousTestCase):
    # No deadline: a batch of 200,000 in chunks of one is 200,000 chunks, whose time
    # on a busy machine says nothing about the rule being checked.
    @settings(deadline=None)
    @given(
        st.integers(0, 200_000),
        st.integers(1, 64),
        st.integers(1, 500),
        st.integers(1, 5000),
    )
    def test_chunks_cover_the_batch_within_their_bounds(
        self, total: int, workers: int, smallest: int, extra: int
    ) -> None:
        largest = smallest + extra - 1
        chunks = shrinking_chunks(total, workers, smallest, largest)
        if total == 0:
            self.assertEqual(chunks, [])
            return
        # Consecutive, covering range(total) exactly.
        starts = [start for start, _ in chunks]
        ends = [end for _, end in chunks]
        self.assertEqual(starts, [0] + ends[:-1])
        self.assertEqual(ends[-1], total)
        counted = sizes(chunks)
        self.assertTrue(all(1 <= n <= largest for n in counted))
        self.assertTrue(all(n >= smallest for n in counted[:-1]))  # all but the last
        self.assertLessEqual(len(chunks), total // smallest + 1)
        # Each worker's first chunk is the same size; then they only shrink.
        first = counted[:workers]
        self.assertLessEqual(len(set(first[:-1])), 1)
        rest = counted[workers:]
        self.assertEqual(rest, sorted(rest, reverse=True))

    def test_the_end_of_a_big_batch_is_in_small_chunks(self) -> None:
        """What the shrinking is for: the last chunks are small, so the workers finish
        within a small chunk of each other, while the middle is in big ones."""
        counted = sizes(shrinking_chunks(10_000, workers=2, smallest=100, largest=10_000))
        self.assertEqual(counted[:2], [625, 625])
        self.assertGreater(max(counted), 2000)
        self.assertTrue(all(n <= 100 for n in counted[-4:]))
        self.assertLess(len(counted), 20)

    def test_bad_bounds(self) -> None:
        for workers, smallest, largest in ((0, 1, 1), (1, 0, 1), (1, 5, 4)):
            with self.assertRaises(ValueError):
                shrinking_chunks(10, workers, smallest, largest)
