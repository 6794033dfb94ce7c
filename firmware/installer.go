package firmware

import (
	"context"
	"errors"
	"io"
)

// Update is what the state machine tells a backend about the update it is
// driving. It is passed by value to every call; backends must not keep state
// that only lives in memory between calls, because the agent may restart
// between any two of them (the state machine persists the update, the backend
// re-derives what it needs from Update and its own durable state).
type Update struct {
	// ID names the update (a UUID); stable across restarts.
	ID string
	// Request is the validated firmwareUpdate payload.
	Request Request
	// ImageSize is the number of bytes written to the sink (after any
	// decompression). Zero until the download has finished; set from the
	// verifying phase on.
	ImageSize int64
	// ImageSHA256 is the lowercase hex SHA-256 of the bytes written to the
	// sink (after any decompression). Empty until the download has finished.
	// A backend may record it, e.g. to check the slot again before commit.
	ImageSHA256 string
	// ReadBackVerified is true only in the Apply call that directly follows
	// the verifying phase in the same run of the agent, when the stored
	// image was read back (ReadBacker) in this run, behind the download or
	// in verifying, and found to be exactly ImageSize bytes hashing to
	// ImageSHA256. It is never persisted: after a restart between verifying
	// and applying it is false, because the storage may have changed
	// meanwhile. A backend that checks the stored image again before using
	// it may skip that check when it is true (the image was read from the
	// storage, not from the page cache, and hashed).
	ReadBackVerified bool
}

// Installer is the one interface the update state machine drives. The state
// machine owns downloading and verifying; an Installer only says where the
// bytes go (Open) and how they become the firmware the device runs (Apply).
//
// Every method may be called again after the agent restarts in the middle of
// it, so each must be idempotent for the same Update.ID.
//
// Abilities beyond these two are separate small interfaces that a backend
// implements only when it has them (checked with a type assertion): Checker,
// Preparer, Fetcher, ReadBacker, LocalBlocks, Rebooter, Committer, RollBacker, Slotted and
// Versioner.
type Installer interface {
	// Open returns the sink the image is written to, positioned at offset.
	// offset is 0 for a fresh download, or the last checkpoint the state
	// machine recorded after a successful Sink.Sync when it resumes after a
	// restart; everything before offset was synced before that checkpoint and
	// must still be there. Bytes after offset may be overwritten. A backend
	// with a fixed capacity (a slot) returns an error from Write once the image
	// would not fit; the error text should say so.
	Open(ctx context.Context, u Update, offset int64) (Sink, error)

	// Apply makes the downloaded and verified image the firmware that runs
	// next: an A/B backend points the bootloader at the new slot for a trial
	// boot; the simulated backend runs its "applying" stage. It is called with
	// u.ImageSize and u.ImageSHA256 set, after the sink has been closed.
	Apply(ctx context.Context, u Update) error
}

// Sink is where the image bytes go. The state machine writes the stream in
// order from one goroutine, calls Sync before it records a resume
// checkpoint, and calls Close once (also on failure), after every Write and
// Sync has returned.
//
// Sync is called from another goroutine than Write and may run at the same
// time as a Write: the stream goes on while the bytes before a checkpoint
// are being made durable. A Sink must allow that (an *os.File does; a Sink
// with its own state must guard it). Sync calls never overlap each other.
type Sink interface {
	io.Writer
	// Sync makes durable (fsync) at least every byte whose Write returned
	// before Sync was called; bytes of a Write running concurrently may or
	// may not be covered. A checkpoint is recorded only after a Sync that
	// started after the checkpoint's last Write returned nil, so a crash
	// never resumes past bytes that may have been lost.
	Sync() error
	io.Closer
}

// Checker is implemented by a backend that can reject a request before it is
// accepted (unsupported URI scheme, image too large for the slot, a required
// sha256 missing). Check runs inside Manager.Start, so it must be quick and
// must not do network I/O; its error becomes the 400 answer of the method.
type Checker interface {
	Check(req Request) error
}

// Preparer is implemented by a backend that has work to do after an update is
// accepted and before the download starts (the simulated backend's stand-by
// wait; an A/B backend checking that the inactive slot is not mounted).
// Prepare runs in the accepted phase and again if the agent restarts there.
type Preparer interface {
	Prepare(ctx context.Context, u Update) error
}

// Fetcher is implemented by a backend that obtains the image itself for some
// URIs that the built-in HTTP(S) download does not handle (the simulated
// backend's time-only download of the tutorial's "test.com"). The bytes it
// writes to dst are counted, hashed, checked against the request's size and
// sha256 and forwarded to the sink exactly like downloaded bytes. A fetch
// interrupted by a restart starts again from the beginning.
type Fetcher interface {
	// Fetches reports whether the backend fetches uri itself.
	Fetches(uri string) bool
	// Fetch writes the image to dst.
	Fetch(ctx context.Context, u Update, dst FetchWriter) error
}

// FetchWriter is the destination a Fetcher writes to.
type FetchWriter interface {
	io.Writer
	// SetTotal declares the expected image size, for progress percentages.
	SetTotal(n int64)
}

// ReadBacker is implemented by a backend that can read back what it stored,
// from the storage itself. The state machine reads the image back while it
// downloads, each part once a Sink.Sync has made it durable, hashes what it
// reads, and in the verifying phase checks that against the hash of the
// bytes it wrote or, when it did not hash them, against the request's
// SHA-256, so a slot that silently dropped or corrupted data is never
// booted. After a restart between downloading and verifying it reads the
// whole image back again in the verifying phase.
type ReadBacker interface {
	// ReadBack opens the image stored for u: after Open, while the image is
	// still being written to the sink, or in the verifying phase. The state
	// machine closes it before the phase ends.
	ReadBack(ctx context.Context, u Update) (StoredImage, error)
}

// StoredImage reads back a stored image, section by section.
type StoredImage interface {
	// Section returns a reader of the n bytes at off as the storage holds
	// them. They must come from the storage, not from a cache that the
	// writes filled (abpart drops the range from the page cache first): a
	// read-back served from memory proves nothing. A reader that ends
	// before n bytes means the storage ends there.
	//
	// The state machine asks for sections in order, each only after a
	// Sink.Sync that covers it has returned, and no section is written
	// again after it was synced. Every section starts on a multiple of
	// ReadBackAlign, and ends on one too except the last, which ends at the
	// end of the image after the final Sync. Later parts of the image may
	// be written while a section is read.
	Section(off, n int64) (io.Reader, error)
	io.Closer
}

// LocalBlocks is implemented by a backend that holds images on the device
// that an adaptive install (Request.IndexURI, docs/adaptive-updates.md) can
// take blocks from instead of fetching them. It is called after Open.
type LocalBlocks interface {
	// LocalBlocks opens, read-only, what u's image may reuse: running is
	// the image the device runs (every block of it is a candidate, found
	// by hash), target is where u is being written (a block at the same
	// offset may be left from an earlier attempt). Either may be nil when
	// the backend has none or cannot read it. The caller closes both.
	LocalBlocks(ctx context.Context, u Update) (running, target LocalImage, err error)
}

// LocalImage is stored bytes an adaptive install reads blocks from. It is
// never written through this interface.
type LocalImage interface {
	io.ReaderAt
	io.Closer
	// Size is how many bytes may be read (a slot's capacity).
	Size() int64
}

// ReadBackAlign is the alignment of StoredImage sections: a multiple of
// every page size Linux uses, so a backend can drop whole pages of a
// section from a cache without touching the bytes after it, which may not
// be durable yet.
const ReadBackAlign = 64 << 10

// Rebooter restarts the device. It is the seam used by the "reboot" direct
// method, and an Installer that implements it is one whose applied image runs
// only after a restart: the state machine persists the rebooting phase, calls
// Reboot and expects the process to be stopped by the shutdown. After the
// restart it resumes in the rebooting phase (see Committer).
type Rebooter interface {
	Reboot(ctx context.Context) error
}

// Committer is implemented by a backend whose applied image runs on trial
// until it is committed (A/B with a boot counter).
type Committer interface {
	// VerifyBoot runs after the restart that followed Apply. It returns nil
	// when the device runs the new image; ErrRebootPending when it still runs
	// the old image and the trial boot is still armed (the reboot never
	// happened, the state machine reboots again); any other error when the new
	// image did not come up (e.g. the bootloader fell back): the state machine
	// then rolls back.
	VerifyBoot(ctx context.Context, u Update) error
	// Commit makes the running trial image permanent. The state machine calls
	// it after VerifyBoot and the configured health check have passed.
	Commit(ctx context.Context, u Update) error
}

// RollBacker is implemented by a backend that can return to the previous
// image after Apply. Rollback makes the previous image the one that boots and
// returns ErrRebootPending if the device must restart to run it (it is
// currently running the new image); the state machine then reboots through
// the Installer's Rebooter and calls Rollback again after the restart, which
// must then return nil. Without a RollBacker a failure after Apply ends in
// the failed phase.
type RollBacker interface {
	Rollback(ctx context.Context, u Update) error
}

// Slotted is implemented by a backend that writes one of several slots; the
// name ("A", "B") is reported in Progress.Slot.
type Slotted interface {
	TargetSlot(ctx context.Context, u Update) (string, error)
}

// Versioner is implemented by a backend that knows which firmware version the
// device runs. Without it the state machine uses Config.CurrentVersion and,
// after an update completes, the update's target version.
type Versioner interface {
	CurrentVersion(ctx context.Context) (string, error)
}

// ErrRebootPending is returned by Committer.VerifyBoot and
// RollBacker.Rollback when the device must restart before the step can
// complete.
var ErrRebootPending = errors.New("firmware: reboot pending")

// ErrBootloaderFellBack is wrapped by Committer.VerifyBoot when the
// bootloader gave up on the new image by itself and the device runs the
// previous one again. The update then ends failed (nothing to undo on the
// running image) after RollBacker.Rollback, if any, has tidied the
// bootloader environment.
var ErrBootloaderFellBack = errors.New("rolled back by bootloader")
