// Package twin owns the device twin's reported side: JSON merge-patch
// documents with IoT Hub's rules and limits (Decode, Merge, ValidatePatch,
// Size), and the persistent reported-patch queue (Queue) through which
// every reported change of the agent goes. Its subpackages decide what is
// reported: twin/report turns firmware progress into patches and
// twin/writable acknowledges desired properties.
//
// The queue stores each patch durably before Report returns, coalesces
// progress patches into the newest pending entry, never merges away a
// milestone (a state change such as "completed" or "failed"), and sends the
// entries in order through a Publisher, retrying transient failures with
// capped, jittered exponential backoff and dropping only entries the hub
// rejects for good (400, 413, other 4xx).
//
// On disk a queue is one directory: one file per pending entry, named by
// its sequence number (<20 digits>.json, holding formatVersion, seq,
// milestone and patch), written with renameio (temp file, fsync, rename)
// and the directory fsynced; a "lock" file held with flock(2) keeps a
// second process out. Empty or torn entry files count as missing.
//
// The package must not speak MQTT, know topic names or build the content of
// reports: the Publisher (the agent's session) carries the bytes, and the
// callers decide what to report. The document functions are shared with the
// local hub, so they hold IoT Hub's rules, not the agent's.
package twin
