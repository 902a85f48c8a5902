"""Patches two defects of the test broker, tansu 0.6.0, where it answers a
Fetch otherwise than Kafka does. Each made a test of ours fail now and then
for reasons that were tansu's, not EmbArk's (see install-tansu.sh).

1. A Fetch from an offset inside a record batch skipped the rest of that
   batch. Kafka answers with the whole batch containing the offset (the
   client drops the records before it); tansu's in-memory engine listed
   only the batches that *start* at or after the offset, and its Fetch
   loop then advanced by record counts from the requested offset, which
   can step over a following small batch. A consumer resuming from a
   committed offset in the middle of a batch (KFC after `kill -9`) never
   saw those misses: the backlog test lost 101 of 5,000 in one run of four.

2. The answer to a Fetch for a topic the broker does not know carried a
   zero topic id and a "current leader". Kafka answers UNKNOWN_TOPIC_ID
   with the request's topic id and no leader. librdkafka 2.12.1 turns a
   current leader in a Fetch answer into a metadata update looked up by
   topic id, or by name when the id is zero, and the Fetch path has no
   name: strcmp on a null pointer, SIGSEGV. A broker restarted empty
   answers every consumer that way: EmbArk died in a third of the broker
   outage runs.

Usage: patch-tansu.py DIR, where DIR holds the unpacked tansu-storage-0.6.0.
Fails loudly unless each piece of code to replace is there exactly once.
"""

import pathlib
import sys

PATCHES = [
    (
        "src/dynostore.rs",
        "        for offset in offsets.split_off(&offset) {\n",
        """        // Kafka answers a fetch from inside a batch with that whole batch
        // (the client drops the records before its offset); listing only
        // the batches that start at or after the offset skipped the rest.
        let mut wanted = offsets.split_off(&offset);
        if !wanted.contains(&offset) {
            if let Some(&containing) = offsets.last() {
                _ = wanted.insert(containing);
            }
        }

        for offset in wanted {
""",
    ),
    (
        "src/service/fetch.rs",
        """            offset += fetched
                .iter()
                .map(|batch| batch.record_count as i64)
                .sum::<i64>();
""",
        """            // The next batch starts after the last one returned, which
            // may have begun before the requested offset.
            if let Some(last) = fetched.last() {
                offset = offset.max(last.base_offset + i64::from(last.last_offset_delta) + 1);
            }
""",
    ),
    (
        "src/service/fetch.rs",
        ".topic_id(Some([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))",
        ".topic_id(fetch.topic_id.or(Some([0; 16])))",
    ),
    (
        "src/service/fetch.rs",
        """.current_leader(Some(
                                LeaderIdAndEpoch::default().leader_id(0).leader_epoch(0),
                            ))""",
        ".current_leader(None)",
    ),
]


def main() -> None:
    root = pathlib.Path(sys.argv[1])
    for name, old, new in PATCHES:
        path = root / name
        text = path.read_text(encoding="utf-8")
        if text.count(old) != 1:
            sys.exit(f"{path}: expected exactly one {old!r}")
        path.write_text(text.replace(old, new), encoding="utf-8")


if __name__ == "__main__":
    main()
