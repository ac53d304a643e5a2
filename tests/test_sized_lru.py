"""``SizedLru``: the byte-bounded least-recently-used map under every cache."""

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.sized_lru import ENTRY_OVERHEAD_BYTES, SizedLru

ENTRY = ENTRY_OVERHEAD_BYTES + 100  # what a 100-byte value costs


def blob_size(key: str, value: bytes) -> int:
    return len(value)


class SizedLruTests(SynchronousTestCase):
    def test_least_recently_used_dropped_to_stay_within_bytes(self) -> None:
        """Past the byte budget the least recently used entries go, read or written."""
        cache: SizedLru[str, bytes] = SizedLru(3 * ENTRY, blob_size)
        for name in ("a", "b", "c"):
            self.assertTrue(cache.put(name, b"x" * 100))
        self.assertEqual(cache.get("a"), b"x" * 100)
        cache.put("d", b"y" * 100)
        self.assertEqual(list(cache), ["c", "a", "d"])
        self.assertEqual(cache.total_bytes, 3 * ENTRY)

    def test_one_big_value_evicts_as_many_as_needed(self) -> None:
        """A value worth two small ones drops the two least recently used."""
        cache: SizedLru[str, bytes] = SizedLru(3 * ENTRY, blob_size)
        for name in ("a", "b", "c"):
            cache.put(name, b"x" * 100)
        cache.put("big", b"y" * (ENTRY + 100))
        self.assertEqual(list(cache), ["c", "big"])
        self.assertLessEqual(cache.total_bytes, cache.max_bytes)

    def test_value_over_the_budget_is_not_kept(self) -> None:
        """A value bigger than the whole budget is refused and leaves the rest alone."""
        cache: SizedLru[str, bytes] = SizedLru(3 * ENTRY, blob_size)
        cache.put("a", b"x" * 100)
        cache.put("b", b"old")
        self.assertFalse(cache.put("b", b"z" * (3 * ENTRY)))
        self.assertEqual(list(cache), ["a"], "the old value under the key is gone too")
        self.assertEqual(cache.total_bytes, ENTRY)

    def test_put_again_measures_again(self) -> None:
        """Replacing a value (or putting a changed one) counts its new size only."""
        cache: SizedLru[str, bytearray] = SizedLru(10 * ENTRY, lambda k, v: len(v))
        value = bytearray(100)
        cache.put("a", value)
        value.extend(bytes(50))
        cache.put("a", value)
        self.assertEqual(cache.total_bytes, ENTRY + 50)
        self.assertEqual(len(cache), 1)

    def test_peek_leaves_the_order(self) -> None:
        """peek reads without making the entry the most recently used."""
        cache: SizedLru[str, bytes] = SizedLru(2 * ENTRY, blob_size)
        cache.put("a", b"x" * 100)
        cache.put("b", b"x" * 100)
        self.assertEqual(cache.peek("a"), b"x" * 100)
        cache.put("c", b"x" * 100)
        self.assertEqual(list(cache), ["b", "c"])

    def test_pop_clear_and_counts(self) -> None:
        """pop and clear give their bytes back; missing keys are None."""
        cache: SizedLru[str, bytes] = SizedLru(5 * ENTRY, blob_size)
        cache.put("a", b"x" * 100)
        cache.put("b", b"x" * 100)
        self.assertEqual(cache.pop("a"), b"x" * 100)
        self.assertIsNone(cache.pop("a"))
        self.assertIsNone(cache.get("a"))
        self.assertEqual((len(cache), cache.total_bytes), (1, ENTRY))
        cache.clear()
        self.assertEqual((len(cache), cache.total_bytes), (0, 0))

    def test_entry_bound(self) -> None:
        """max_entries bounds the count too; 0 keeps nothing."""
        cache: SizedLru[str, bytes] = SizedLru(100 * ENTRY, blob_size, max_entries=2)
        for name in ("a", "b", "c"):
            cache.put(name, b"")
        self.assertEqual(list(cache), ["b", "c"])
        none: SizedLru[str, bytes] = SizedLru(100 * ENTRY, blob_size, max_entries=0)
        self.assertFalse(none.put("a", b""))
        self.assertEqual(len(none), 0)

    def test_zero_budget_keeps_nothing(self) -> None:
        """With a budget of 0 bytes nothing is kept."""
        cache: SizedLru[str, bytes] = SizedLru(0, blob_size)
        self.assertFalse(cache.put("a", b""))
        self.assertEqual(cache.total_bytes, 0)

    def test_evicted_entries_are_reported(self) -> None:
        """Entries dropped to stay within the budget go to ``on_evict``; popped, cleared
        and replaced ones do not."""
        evicted: list[tuple[str, bytes]] = []
        cache: SizedLru[str, bytes] = SizedLru(
            2 * ENTRY, blob_size, on_evict=lambda k, v: evicted.append((k, v))
        )
        cache.put("a", b"a" * 100)
        cache.put("a", b"A" * 100)
        cache.put("b", b"b" * 100)
        cache.pop("b")
        cache.put("c", b"c" * 100)
        self.assertEqual(evicted, [])
        cache.put("d", b"d" * 100)
        self.assertEqual(evicted, [("a", b"A" * 100)])
        cache.clear()
        self.assertEqual(len(evicted), 1)
