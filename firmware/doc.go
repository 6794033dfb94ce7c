// Package firmware changes the device: it owns the update state machine
// (Manager), the streaming download and verification of images, and the
// Installer interface that backends implement.
//
// Data flow: the firmwareUpdate method handler calls ParseRequest and
// Manager.Start, which validates, persists the "accepted" phase and returns at
// once. Manager.Run drives the update through accepted → downloading →
// verifying → [waitingForWindow] → applying → [rebooting → committing] →
// completed, or to failed / rolledBack. Each phase is written to StateDir
// (atomically, fsynced) before its side effect, and a restarted agent
// resumes from the last persisted phase through a table whose rows say why
// resuming there is right. A transition counter ends an update that keeps
// restarting, so a boot loop
// never becomes an update loop. A state file that cannot be written (a full
// disk) holds the update, never ends it and never stops the Manager: the
// write is retried with backoff and Progress.Problem says why it waits
// (hold.go says what waits for which write). Cancel ends an update that
// has not been applied yet (cancel.go): the record says failed with code
// cancelled before the running step is stopped and waited for.
//
// Downloads stream through one fixed buffer into the Installer's Sink;
// transient HTTP failures are retried with backoff and resumed with Range
// requests, and the write offset is checkpointed so a kill -9 continues
// where the last checkpoint left off. Checkpoints are made durable on a
// second goroutine (Sink.Sync, then the checkpoint file) while the stream
// goes on; a checkpoint is written only after a Sync that covers it, and
// the stream waits when it is two checkpoint intervals ahead of the last
// durable one.
//
// A backend that can read back (ReadBacker, e.g. abpart) has the image
// read back from the storage, not from the page cache, behind the
// download: after each Sync the bytes it made durable are read and hashed
// on two more goroutines (one reads, one hashes), so network, disk writes,
// disk reads and hashing all overlap and only the last window is left to
// read when the stream ends. The verifying phase compares: the size and
// SHA-256 of what was read back against what was written, and against the
// request. When the request names the SHA-256 of an uncompressed image, the
// stream does not hash at all: the read-back's hash of what the storage
// holds is checked against the request directly. Otherwise the stream
// hashes what it writes and its hash state goes into each checkpoint. The
// read-back keeps no state across a restart: a resumed download reads the
// image back from byte 0 again (a read-back from before the crash vouches
// only for the storage before the crash), and an agent restarted after the
// download reads it all back in the verifying phase. The Apply that
// directly follows in the same run is told (Update.ReadBackVerified) and
// need not hash the image again.
//
// gzip and zstd images are decoded on the fly and hashed on the stream
// (the request's SHA-256 is over the transfer); their decoders cannot be
// checkpointed, so within one run a broken transfer still resumes by Range
// (below the decoder) but after a restart a compressed download starts
// again from zero. With Config.Signatures (package signature) the
// request's minisign signature is fetched before the image, checked while
// the image streams, and its running state is checkpointed, so a resumed
// download still verifies.
//
// Where the parts live:
//
//   - manager.go: Config, the Manager, the resume table and the phase steps
//     other than downloading's stream and verifying's checks;
//   - download.go: the downloading step's stream (one buffer from the
//     source, HTTP or a Fetcher, through an optional gzip/zstd decoder,
//     hashed when it must be and written to the Sink);
//   - transport.go: the HTTP side of a download, a ranged reader that
//     resumes with Range/If-Range and retries with backoff, and how HTTP
//     answers and network errors are classified;
//   - checkpoint.go: the persisted resume point, where a download resumes,
//     and the syncer that makes checkpoints durable beside the stream;
//   - verify.go: the verifying step (size, SHA-256, signature, read-back)
//     and the read-back that runs behind the download;
//   - window.go: maintenance windows and the waitingForWindow step;
//   - hold.go: what a state file that cannot be written holds, and the
//     retry of the write;
//   - signature.go, request.go, store.go, installer.go: the signature check,
//     the method payload, the state files and the backend interfaces.
//
// Backends live in subpackages (simulated, abpart) and implement Installer
// plus the optional abilities they have (Checker, Preparer, Fetcher,
// ReadBacker, LocalBlocks, Rebooter, Committer, RollBacker, Slotted,
// Versioner). An update that names a block index (Request.IndexURI) and an
// installer with LocalBlocks is installed adaptively (adaptive.go): the same
// stream, fed with blocks copied from the device or fetched by Range.
//
// This package must not talk to the hub or format twin properties: it
// reports Progress to an Observer and the agent turns that into reported
// properties. It does not throttle progress by time either: a download
// reports each whole percent (see Config.Observer) and the Observer
// (twin/report) is the one place that decides how often to send it. It must not write to the running slot: where bytes go is the
// backend's decision.
package firmware
