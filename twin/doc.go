// Package twin owns the device twin's reported side: JSON merge-patch
// documents with IoT Hub's rules and limits (Decode, Merge, ValidatePatch,
// Size), and the persistent reported-patch queue (Queue) through which
// every reported change of the agent goes. Its subpackages decide what is
// reported: twin/report turns firmware progress into patches and
// twin/writable acknowledges desired properties.
//
// The queue stores each milestone (a state change such as "completed" or
// "failed", a desired-property acknowledgement, the start-up report)
// durably before Report returns, and keeps progress patches in memory: a
// long download reports progress every few seconds, and writing each one
// would cost the flash two fsyncs to store it and one to remove it, for
// data the next milestone replaces. Progress patches coalesce into the
// newest pending progress entry; a milestone merges into that entry (which
// is then written) or follows it, and is never merged away, so the hub
// sees every milestone in order and never older progress after it. A
// crash loses at most the progress queued since the last milestone; the
// agent reports its whole state at every start. The queue sends the
// entries in order through a Publisher, retrying transient failures with
// capped, jittered exponential backoff and dropping only entries the hub
// rejects for good (400, 413, other 4xx) — a milestone only after the
// caller's MakeRoom withdrew what it can do without and the hub refused it
// again, since IoT Hub refuses a patch with 400 or 413 when the reported
// properties would exceed 32 KB. It does not pace sends: how
// often progress is reported is twin/report's decision. A milestone whose
// file cannot be written (disk full, read-only file system) is not refused:
// it is held in memory and sent like the others, SaveProblem says why, and
// the write is retried with backoff until the directory takes it.
//
// On disk a queue is one directory: one file per pending milestone, named
// by its sequence number (<20 digits>.json, holding formatVersion, seq,
// milestone and patch), written with renameio (temp file, fsync, rename)
// and the directory fsynced, and removed (directory fsynced) once the hub
// has it; a "lock" file held with flock(2) keeps a second process out.
// Empty or torn entry files count as missing. Format change: versions
// before this one also wrote a file for every progress patch (milestone
// false). The record did not change and formatVersion is still 1: such
// files load, are sent in order and removed like milestones (progress
// merged into one is written back to it), and an older agent reads the
// files this one writes.
//
// The package must not speak MQTT, know topic names or build the content of
// reports: the Publisher (the agent's session) carries the bytes, and the
// callers decide what to report. The document functions are shared with the
// local hub, so they hold IoT Hub's rules, not the agent's.
package twin
