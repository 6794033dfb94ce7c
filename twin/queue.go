package twin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/renameio/v2"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/iothub"
)

// Publisher sends one reported-properties patch to the hub and waits for
// its answer. The agent's session implements it over
// $iothub/twin/PATCH/properties/reported/. It must honour ctx (the queue
// bounds every request with QueueOptions.RequestTimeout) and return
// iothub.ErrNotConnected while there is no connection and a *iothub.StatusError when the
// hub answers with a status other than 2xx.
type Publisher interface {
	PatchReported(ctx context.Context, body []byte) (version int64, err error)
}

var (
	// ErrClosed is returned by a Queue after Close.
	ErrClosed = errors.New("twin: queue closed")
	// ErrLocked is returned by OpenQueue when another open Queue (in this
	// or another process) holds the directory.
	ErrLocked = errors.New("twin: queue directory in use")
	// ErrRunning is returned by Run when another Run is active.
	ErrRunning = errors.New("twin: queue sender already running")
)

// QueueOptions configure a Queue. Zero durations take the defaults.
type QueueOptions struct {
	// Dir holds the queue's files and nothing else. It is created if
	// missing.
	Dir string
	// MinBackoff is the first retry wait after a transient failure
	// (default 1s); it doubles, with ±50% jitter, up to MaxBackoff
	// (default 60s), and resets after a success.
	MinBackoff, MaxBackoff time.Duration
	// RequestTimeout bounds one PatchReported call (default 30s).
	RequestTimeout time.Duration
	// MakeRoom, when set, is asked for a patch that withdraws (sets to
	// null) reported data the caller can do without, when the hub refuses a
	// milestone for good with 400 or 413: what IoT Hub answers when a patch
	// would take the reported properties over their 32 KB (the code in the
	// body is not documented, so any such refusal of a milestone counts).
	// The queue sends that patch (split to fit), then the milestone again;
	// refused once more, the milestone is dropped. refused is a copy of the
	// refused patch; ctx is bounded by RequestTimeout. nil: nothing to
	// withdraw.
	MakeRoom func(ctx context.Context, refused map[string]any) map[string]any
	// OnSaveProblem, when set, is called when SaveProblem changes: the
	// queue could not write a file (disk full, read-only, I/O error), or
	// can again. It runs without the queue's lock, on whichever goroutine
	// saw the change, and must return quickly.
	OnSaveProblem func()
}

// Defaults of QueueOptions (docs/iothub-protocol.md §9.6).
const (
	DefaultMinBackoff     = time.Second
	DefaultMaxBackoff     = time.Minute
	DefaultRequestTimeout = 30 * time.Second
)

// formatVersion is written into every entry file. Files of another
// version are left in place and not sent. Files with milestone false are
// no longer written (progress stays in memory) but still load: they are
// what versions before that left on disk. The record is unchanged, so the
// version is too, and an older agent still reads what this one writes.
const formatVersion = 1

// record is the on-disk form of one entry: <Dir>/<seq, 20 digits>.json.
type record struct {
	FormatVersion int             `json:"formatVersion"`
	Seq           uint64          `json:"seq"`
	Milestone     bool            `json:"milestone"`
	Patch         json.RawMessage `json:"patch"`
}

// entry is one pending patch.
type entry struct {
	seq       uint64
	milestone bool
	patch     map[string]any
	// durable is set when the entry's file holds it: every milestone, and
	// progress entries an older version wrote. Other progress entries live
	// in memory only.
	durable bool
	// sending is set while the sender publishes this entry: Report then
	// appends instead of merging, so an acknowledgement never covers a
	// change that was not in the published body.
	sending bool
	// delivered is set when the hub accepted the entry but its file could
	// not be removed; the sender then retries the removal, not the publish.
	delivered bool
	// unsaved is set on a milestone (or an older version's entry) whose
	// file could not be written: it is held in memory, sent like any
	// other, and written as soon as the directory takes writes again.
	unsaved bool
	// roomMade is set once MakeRoom's patch was delivered for this entry:
	// refused again, it is dropped. Owned by the sender.
	roomMade bool
}

// SaveProblem says why the queue cannot save to its directory. While there
// is one, milestones that could not be written are held in memory: they are
// sent as usual, but a crash or stop before they are delivered loses them
// (the agent's start-up report states its state again).
type SaveProblem struct {
	Err     error     // the last failed write
	Since   time.Time // the first failure since the directory last took a write
	Unsaved int       // milestones held in memory only
}

// Queue is a persistent, coalescing, ordered queue of reported-property
// patches. Report may be called from any goroutine; Run is the one sender.
type Queue struct {
	dir  string
	opts QueueOptions
	pub  Publisher
	log  *zap.Logger

	kick    chan struct{} // cap 1: an entry was added or released
	wake    chan struct{} // cap 1: Wake was called
	running atomic.Bool   // a Run is active

	mu      sync.Mutex // guards the fields below and all file changes
	entries []*entry   // in order; entries[0] is the head
	nextSeq uint64
	empty   chan struct{} // closed while entries is empty (for Flush)
	lock    *os.File      // flock(2) on <Dir>/lock, held until Close
	dirf    *os.File      // Dir, opened for fsync
	closed  bool
	saveErr error     // the last failed write; nil once a write succeeds
	saveAt  time.Time // the first failed write since the last success

	saveKick chan struct{} // cap 1: a write failed, the saver retries
	// writeFile stores one file atomically: renameio (temp file in Dir,
	// fsync, rename). Tests replace it to inject write errors.
	writeFile func(path string, b []byte) error

	syncs atomic.Uint64 // fsyncs made (entry files and Dir), see Syncs
}

// OpenQueue opens (or creates) the queue in opts.Dir and loads the entries
// persisted there. Empty or torn entry files and leftover temporary files
// are removed with a warning: they were never acknowledged by Report.
// log may be nil.
func OpenQueue(opts QueueOptions, pub Publisher, log *zap.Logger) (*Queue, error) {
	if opts.Dir == "" {
		return nil, errors.New("twin: queue directory not set")
	}
	if pub == nil {
		return nil, errors.New("twin: queue publisher is nil")
	}
	if log == nil {
		log = zap.NewNop()
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = opts.MinBackoff
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("twin: create queue directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(opts.Dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("twin: open queue lock: %w", err)
	}
	// Two agents writing one queue would interleave and lose entries.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, opts.Dir)
		}
		return nil, fmt.Errorf("twin: lock queue directory: %w", err)
	}
	dirf, err := os.Open(opts.Dir)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("twin: open queue directory: %w", err)
	}
	q := &Queue{
		dir:      opts.Dir,
		opts:     opts,
		pub:      pub,
		log:      log,
		kick:     make(chan struct{}, 1),
		wake:     make(chan struct{}, 1),
		empty:    make(chan struct{}),
		lock:     lock,
		dirf:     dirf,
		saveKick: make(chan struct{}, 1),
	}
	q.writeFile = func(path string, b []byte) error {
		// The temporary file goes into Dir itself: same file system, and
		// renameio does not have to probe for a temporary directory each time.
		return renameio.WriteFile(path, b, 0o600, renameio.WithTempDir(q.dir))
	}
	if err := q.load(); err != nil {
		dirf.Close()
		lock.Close()
		return nil, err
	}
	if len(q.entries) == 0 {
		close(q.empty)
	}
	return q, nil
}

// entryName is the file name of entry seq; the fixed width keeps the
// directory listing in queue order.
func entryName(seq uint64) string { return fmt.Sprintf("%020d.json", seq) }

func parseEntryName(name string) (uint64, bool) {
	base, ok := strings.CutSuffix(name, ".json")
	if !ok || len(base) != 20 {
		return 0, false
	}
	seq, err := strconv.ParseUint(base, 10, 64)
	return seq, err == nil
}

func (q *Queue) load() error {
	des, err := os.ReadDir(q.dir)
	if err != nil {
		return fmt.Errorf("twin: read queue directory: %w", err)
	}
	removed := false
	for _, de := range des {
		name := de.Name()
		path := filepath.Join(q.dir, name)
		if strings.HasPrefix(name, ".") && de.Type().IsRegular() {
			// A temporary file of an interrupted atomic write.
			q.log.Warn("removing leftover temporary file", zap.String("file", name))
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("twin: remove leftover %s: %w", name, err)
			}
			removed = true
			continue
		}
		seq, ok := parseEntryName(name)
		if !ok || !de.Type().IsRegular() {
			continue
		}
		q.nextSeq = max(q.nextSeq, seq+1)
		e, version, err := readEntry(path, seq)
		switch {
		case err != nil:
			// rename(2) after fsync makes a torn file impossible on a
			// sound file system; if one shows up anyway it was never
			// acknowledged, so it counts as missing.
			q.log.Warn("removing unreadable queue entry", zap.String("file", name), zap.Error(err))
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("twin: remove unreadable entry %s: %w", name, err)
			}
			removed = true
		case version != formatVersion:
			q.log.Error("skipping queue entry of another format version; it stays on disk",
				zap.String("file", name), zap.Int("format_version", version))
		default:
			q.entries = append(q.entries, e)
		}
	}
	slices.SortFunc(q.entries, func(a, b *entry) int {
		switch {
		case a.seq < b.seq:
			return -1
		case a.seq > b.seq:
			return 1
		}
		return 0
	})
	if removed {
		if err := q.syncDir(); err != nil {
			return fmt.Errorf("twin: sync queue directory: %w", err)
		}
	}
	if len(q.entries) > 0 {
		q.log.Info("loaded pending reported patches", zap.Int("entries", len(q.entries)))
	}
	return nil
}

// readEntry reads one entry file. A version other than formatVersion is
// returned with a nil entry and no error.
func readEntry(path string, seq uint64) (*entry, int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	if len(b) == 0 {
		return nil, 0, errors.New("empty file")
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, 0, err
	}
	if r.FormatVersion != formatVersion {
		if r.FormatVersion == 0 {
			return nil, 0, errors.New("no format version")
		}
		return nil, r.FormatVersion, nil
	}
	if r.Seq != seq {
		return nil, 0, fmt.Errorf("sequence %d does not match the file name", r.Seq)
	}
	patch, err := Decode(r.Patch)
	if err != nil {
		return nil, 0, err
	}
	return &entry{seq: seq, milestone: r.Milestone, patch: patch, durable: true}, r.FormatVersion, nil
}

// write stores e durably: atomic replace, then the directory is synced so
// the new name survives a power cut.
func (q *Queue) write(e *entry) error {
	patch, err := json.Marshal(e.patch)
	if err != nil {
		return fmt.Errorf("twin: encode entry %d: %w", e.seq, err)
	}
	b, err := json.Marshal(record{FormatVersion: formatVersion, Seq: e.seq, Milestone: e.milestone, Patch: patch})
	if err != nil {
		return fmt.Errorf("twin: encode entry %d: %w", e.seq, err)
	}
	path := filepath.Join(q.dir, entryName(e.seq))
	q.syncs.Add(1) // renameio fsyncs the temporary file before the rename
	if err := q.writeFile(path, b); err != nil {
		return fmt.Errorf("twin: write entry %d: %w", e.seq, err)
	}
	return q.syncDir()
}

// probeName is the file the saver writes to learn whether the directory
// takes writes again when no entry waits to be saved. Its name starts
// with a dot, so a crash that leaves it behind is cleaned up by load.
const probeName = ".probe"

// probe writes and removes a small file, as an entry would be written.
func (q *Queue) probe() error {
	path := filepath.Join(q.dir, probeName)
	q.syncs.Add(1)
	if err := q.writeFile(path, []byte("gwagent twin queue write probe\n")); err != nil {
		return fmt.Errorf("twin: write to the queue directory: %w", err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("twin: remove %s: %w", probeName, err)
	}
	return nil
}

// persistLocked writes the entries held in memory for want of a write
// (unsaved), in queue order, and stops at the first failure: the files on
// disk never hold a state change without those queued before it.
func (q *Queue) persistLocked() error {
	for _, e := range q.entries {
		if !e.unsaved || e.delivered {
			continue // a delivered entry needs no file
		}
		if err := q.write(e); err != nil {
			if !e.durable {
				// The rename may have happened before the failure; a file
				// the queue does not count as written must not be sent
				// again after a restart.
				_ = os.Remove(filepath.Join(q.dir, entryName(e.seq)))
			}
			return err
		}
		e.unsaved, e.durable = false, true
	}
	return nil
}

// savedLocked records the outcome of a write attempt (err nil: the
// directory took the write) and reports whether SaveProblem changed. The
// first failure is logged as an error naming the cause; the recovery too.
func (q *Queue) savedLocked(err error) bool {
	if err != nil {
		first := q.saveErr == nil
		q.saveErr = err
		q.signal(q.saveKick)
		if first {
			q.saveAt = time.Now()
			q.log.Error("cannot save reported state changes to disk; holding them in memory, sending them "+
				"as usual and retrying the write", zap.String("dir", q.dir), zap.Int("unsaved", q.unsavedLocked()), zap.Error(err))
		}
		return true // the cause or the count may have changed
	}
	if q.saveErr == nil {
		return false
	}
	if q.unsavedLocked() > 0 {
		return true
	}
	q.log.Info("reported state changes are saved to disk again", zap.String("dir", q.dir),
		zap.Duration("after", time.Since(q.saveAt)), zap.NamedError("last_error", q.saveErr))
	q.saveErr, q.saveAt = nil, time.Time{}
	return true
}

func (q *Queue) unsavedLocked() int {
	n := 0
	for _, e := range q.entries {
		if e.unsaved && !e.delivered {
			n++
		}
	}
	return n
}

// SaveProblem returns why the queue cannot save to its directory, or nil
// when its last write succeeded.
func (q *Queue) SaveProblem() *SaveProblem {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.saveErr == nil {
		return nil
	}
	return &SaveProblem{Err: q.saveErr, Since: q.saveAt, Unsaved: q.unsavedLocked()}
}

func (q *Queue) notifySave(changed bool) {
	if changed && q.opts.OnSaveProblem != nil {
		q.opts.OnSaveProblem()
	}
}

// saveLoop retries the write of unsaved entries (or, when none is left, a
// probe) with capped, jittered exponential backoff while the directory
// refuses writes. Report retries too whenever it queues a milestone.
func (q *Queue) saveLoop(ctx context.Context) {
	b := retry.NewBackoff(q.opts.MinBackoff, q.opts.MaxBackoff)
	for {
		select {
		case <-ctx.Done():
			return
		case <-q.saveKick:
		}
		b.Reset()
		for {
			t := time.NewTimer(retry.Next(b))
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			if q.retrySave() {
				break
			}
		}
	}
}

// retrySave makes one write attempt; true when the directory took it (or
// a Report's write already had).
func (q *Queue) retrySave() bool {
	q.mu.Lock()
	if q.closed || q.saveErr == nil {
		q.mu.Unlock()
		return true
	}
	var err error
	if q.unsavedLocked() > 0 {
		err = q.persistLocked()
	} else {
		err = q.probe()
	}
	if err != nil {
		q.log.Debug("reported state changes still not saved; retrying", zap.Int("unsaved", q.unsavedLocked()), zap.Error(err))
		q.saveErr = err
		q.mu.Unlock()
		return false
	}
	changed := q.savedLocked(nil)
	q.mu.Unlock()
	q.notifySave(changed)
	return true
}

// remove deletes e's file durably.
func (q *Queue) remove(e *entry) error {
	err := os.Remove(filepath.Join(q.dir, entryName(e.seq)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("twin: remove entry %d: %w", e.seq, err)
	}
	return q.syncDir()
}

// syncDir makes the directory's names (creations, renames, removals)
// durable.
func (q *Queue) syncDir() error {
	q.syncs.Add(1)
	if err := q.dirf.Sync(); err != nil {
		return fmt.Errorf("twin: sync queue directory: %w", err)
	}
	return nil
}

// Syncs is the number of fsyncs the queue has made since OpenQueue, on
// entry files and on its directory: what reporting costs a device's flash.
func (q *Queue) Syncs() uint64 { return q.syncs.Load() }

// Report queues a reported-properties patch. A milestone is on disk
// (fsynced) when Report returns, so a crash right after loses nothing. A
// progress patch (milestone false) is kept in memory only: it costs no
// disk write, and a crash or stop before it is delivered loses it. That
// is safe for what callers report as progress: values that the next
// milestone or the report made at every start state again. patch may hold
// any JSON-encodable values; it is copied, checked with ValidatePatch and
// against MaxReportedSize (errors wrap ErrInvalid). An empty patch is a
// no-op.
//
// When the milestone's file cannot be written (disk full, read-only file
// system) the milestone is not refused: it is held in memory and sent
// like any other, SaveProblem says why, and the write is retried with
// backoff (by Run) and before every later milestone, in queue order, until
// the directory takes it. Only a crash or stop before it is delivered or
// written loses it. Report's errors are ErrInvalid and ErrClosed.
//
// The patch is merged into the newest pending entry unless that entry is a
// milestone, is being sent, or the two cannot be expressed as one merge
// patch; the merged entry is a milestone if the new patch is, and is then
// written to disk. So progress patches collapse into one, a milestone
// carries the progress queued before it, and every milestone (a state
// change) reaches the hub, in order, after what was queued before it.
func (q *Queue) Report(patch map[string]any, milestone bool) error {
	p, err := normalize(patch)
	if err != nil {
		return err
	}
	if err := ValidatePatch(p); err != nil {
		return err
	}
	if n := Size(p); n > MaxReportedSize {
		return &ValidationError{Reason: fmt.Sprintf("patch of %d bytes exceeds %d", n, MaxReportedSize)}
	}
	if len(p) == 0 {
		return nil
	}

	changed := false
	defer func() { q.notifySave(changed) }() // after the unlock below
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	if n := len(q.entries); n > 0 {
		tail := q.entries[n-1]
		if !tail.milestone && !tail.sending && !tail.delivered {
			merged, ok := composePatches(tail.patch, p)
			if ok && Size(merged) <= MaxReportedSize {
				// A file an older version wrote is kept up to date, so it
				// never holds less than memory.
				e := &entry{seq: tail.seq, milestone: milestone, patch: merged, durable: tail.durable,
					unsaved: milestone || tail.durable}
				q.entries[n-1] = e
				if e.unsaved {
					changed = q.savedLocked(q.persistLocked())
				}
				q.signal(q.kick)
				return nil
			}
		}
	}
	// Numbers are unique among the entries on disk: never reused, even
	// after a failed write that may have left the file behind. Progress
	// entries take one too (for the logs, and a milestone merged into one
	// is written under it).
	e := &entry{seq: q.nextSeq, milestone: milestone, patch: p, unsaved: milestone}
	q.nextSeq++
	if len(q.entries) == 0 {
		q.empty = make(chan struct{})
	}
	q.entries = append(q.entries, e)
	if milestone {
		changed = q.savedLocked(q.persistLocked())
	}
	q.signal(q.kick)
	return nil
}

// normalize turns a caller's patch into a document as Decode makes it (a
// private deep copy with json.Number numbers).
func normalize(patch map[string]any) (map[string]any, error) {
	if patch == nil {
		return map[string]any{}, nil
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return nil, &ValidationError{Reason: "not JSON-encodable: " + err.Error()}
	}
	return Decode(b)
}

// composePatches returns one merge patch r with Merge(Merge(d, a), b) ==
// Merge(d, r) for every document d, or false when there is none: where a
// sets a non-object value (or null) and b then sets an object, applying b
// replaces what a left, but a single patch would merge into the old value.
// a and b are not modified.
func composePatches(a, b map[string]any) (map[string]any, bool) {
	if !composable(a, b) {
		return nil, false
	}
	return composeInto(copyValue(a).(map[string]any), b), true
}

func composable(a, b map[string]any) bool {
	for k, bv := range b {
		bm, bIsObj := bv.(map[string]any)
		av, present := a[k]
		if !bIsObj || !present {
			continue
		}
		am, aIsObj := av.(map[string]any)
		if !aIsObj || !composable(am, bm) {
			return false
		}
	}
	return true
}

func composeInto(a, b map[string]any) map[string]any {
	for k, bv := range b {
		if bm, ok := bv.(map[string]any); ok {
			if am, ok := a[k].(map[string]any); ok {
				a[k] = composeInto(am, bm)
				continue
			}
		}
		a[k] = copyValue(bv) // nulls stay: they delete on the hub
	}
	return a
}

// signal does a non-blocking send on a 1-slot channel.
func (q *Queue) signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Wake tells the sender that the connection is (re)established: a backoff
// wait in progress ends now and the head entry is retried.
func (q *Queue) Wake() { q.signal(q.wake) }

// Len is the number of pending entries, including one being sent.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.entries)
}

// Durable is the number of pending entries on disk: what a stop keeps for
// the next start (progress held in memory is not among them).
func (q *Queue) Durable() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, e := range q.entries {
		if e.durable {
			n++
		}
	}
	return n
}

// Flush waits until every entry has been acknowledged by the hub (or
// dropped as rejected), or until ctx is done. It needs Run to be running.
func (q *Queue) Flush(ctx context.Context) error {
	q.mu.Lock()
	empty := q.empty
	q.mu.Unlock()
	select {
	case <-empty:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("twin: flush with %d entries pending: %w", q.Len(), ctx.Err())
	}
}

// Close releases the queue directory. Pending milestones stay on disk for
// the next OpenQueue; pending progress, kept in memory, is dropped (the
// caller reports its state again at the next start). Call it after Run has
// returned.
func (q *Queue) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	if n := q.unsavedLocked(); n > 0 {
		q.log.Warn("reported state changes that could not be saved to disk are lost with this stop; "+
			"the next start reports the state again", zap.Int("unsaved", n), zap.NamedError("cause", q.saveErr))
	}
	return errors.Join(q.dirf.Close(), q.lock.Close())
}

// Run is the sender: it publishes the head entry, removes it once the hub
// accepted it, and goes on in order until ctx is done (a normal stop: it
// then returns nil). Transient failures (iothub.ErrNotConnected, timeouts,
// temporary *iothub.StatusError and any other error) are retried with capped,
// jittered exponential backoff; Wake cuts a wait short. A permanent
// rejection (a non-temporary 4xx *iothub.StatusError) is logged with the patch's
// keys and the entry dropped; a milestone refused with 400 or 413 first
// gets QueueOptions.MakeRoom's withdrawal and one more try. The queue does not pace sends: the callers
// decide how often to report (twin/report limits progress). An idle queue
// waits for Report without timers. While the directory refuses writes
// (SaveProblem), Run also retries them, with the same backoff bounds.
func (q *Queue) Run(ctx context.Context) error {
	if !q.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer q.running.Store(false)

	var saver sync.WaitGroup
	defer saver.Wait()
	sctx, stopSaver := context.WithCancel(ctx)
	defer stopSaver()
	saver.Go(func() { q.saveLoop(sctx) })

	b := retry.NewBackoff(q.opts.MinBackoff, q.opts.MaxBackoff)
	attempt := 0
	for {
		e, body, err := q.head()
		if err != nil {
			return err
		}
		if e == nil {
			select {
			case <-ctx.Done():
				return nil
			case <-q.kick:
			}
			continue
		}
		// A Wake that came before this attempt is answered by it.
		select {
		case <-q.wake:
		default:
		}

		var failure error
		if body != nil {
			attempt++
			failure = q.send(ctx, e, body, attempt)
		} else {
			failure = q.finish(e) // delivered earlier; only the removal is left
		}
		if ctx.Err() != nil {
			return nil
		}
		if failure == nil {
			b.Reset()
			attempt = 0
			continue
		}
		// Cap the jittered value too: MaxBackoff is a promise.
		d := min(b.NextBackOff(), q.opts.MaxBackoff)
		lvl := zap.WarnLevel
		if errors.Is(failure, iothub.ErrNotConnected) {
			lvl = zap.DebugLevel // expected while offline; the session logs the outage
		}
		q.log.Log(lvl, "reported patch not delivered; retrying",
			zap.Uint64("seq", e.seq), zap.Int("attempt", attempt),
			zap.Duration("backoff", d), zap.Error(failure))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-q.wake:
			t.Stop()
		case <-t.C:
		}
	}
}

// head returns the head entry, marked as being sent, with its body; a nil
// body means it was delivered already and only needs removing. A nil entry
// means the queue is empty.
func (q *Queue) head() (*entry, []byte, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, nil, ErrClosed
	}
	if len(q.entries) == 0 {
		return nil, nil, nil
	}
	e := q.entries[0]
	if e.delivered {
		return e, nil, nil
	}
	body, err := json.Marshal(e.patch)
	if err != nil {
		// Cannot happen for a decoded document; keep the entry visible.
		return nil, nil, fmt.Errorf("twin: encode entry %d: %w", e.seq, err)
	}
	e.sending = true
	return e, body, nil
}

// send publishes e once. It returns nil when the entry is done with
// (accepted and removed, or rejected for good and dropped) and the error
// to back off on otherwise.
func (q *Queue) send(ctx context.Context, e *entry, body []byte, attempt int) error {
	rctx, cancel := context.WithTimeout(ctx, q.opts.RequestTimeout)
	version, err := q.pub.PatchReported(rctx, body)
	cancel()

	if err == nil {
		q.log.Debug("reported patch delivered", zap.Uint64("seq", e.seq),
			zap.Bool("milestone", e.milestone), zap.Int64("version", version), zap.Int("attempt", attempt))
		q.mu.Lock()
		e.sending = false
		e.delivered = true
		q.mu.Unlock()
		return q.finish(e)
	}

	q.mu.Lock()
	e.sending = false
	q.mu.Unlock()
	if se := permanent(err); se != nil {
		if retry, err := q.makeRoom(ctx, e, se); retry {
			return err
		}
		msg := "reported patch rejected by the hub; dropped"
		if e.roomMade {
			msg = "reported patch rejected by the hub even after making room; dropped"
		}
		q.log.Error(msg,
			zap.Uint64("seq", e.seq), zap.Bool("milestone", e.milestone),
			zap.Int("status", se.Status), zap.Strings("keys", keyPaths(e.patch, 50)),
			zap.ByteString("hub_error", se.Body))
		q.mu.Lock()
		e.delivered = true // nothing more to send; only the removal is left
		q.mu.Unlock()
		return q.finish(e)
	}
	if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("no answer within %v: %w", q.opts.RequestTimeout, err)
	}
	return err
}

// permanent returns err's *iothub.StatusError if the hub refused for good
// (a 4xx other than 408 and 429), else nil.
func permanent(err error) *iothub.StatusError {
	if se := (*iothub.StatusError)(nil); errors.As(err, &se) && se.Status >= 400 && se.Status < 500 && !se.Temporary() {
		return se
	}
	return nil
}

// makeRoom answers a milestone the hub refused with 400 or 413: the
// reported properties may be full. It sends MakeRoom's withdrawal and
// returns true when e is to be sent again, with nil to send it now or the
// error to back off on (the withdrawal failed transiently; MakeRoom is
// asked again if the milestone is refused again). false: drop e.
func (q *Queue) makeRoom(ctx context.Context, e *entry, se *iothub.StatusError) (bool, error) {
	if q.opts.MakeRoom == nil || !e.milestone || e.roomMade || (se.Status != 400 && se.Status != 413) {
		return false, nil
	}
	rctx, cancel := context.WithTimeout(ctx, q.opts.RequestTimeout)
	room := q.opts.MakeRoom(rctx, copyValue(e.patch).(map[string]any))
	cancel()
	if err := ValidatePatch(room); len(room) == 0 || err != nil {
		q.log.Error("the hub refused a state change and nothing can be withdrawn to make room in the reported properties",
			zap.Uint64("seq", e.seq), zap.Int("status", se.Status), zap.ByteString("hub_error", se.Body))
		return false, nil
	}
	for _, part := range SplitPatch(room, MaxReportedSize/2) {
		body, err := json.Marshal(part)
		if err != nil {
			return false, nil
		}
		rctx, cancel := context.WithTimeout(ctx, q.opts.RequestTimeout)
		_, err = q.pub.PatchReported(rctx, body)
		cancel()
		if se := permanent(err); se != nil {
			q.log.Error("the hub refused the withdrawal made to make room", zap.Uint64("seq", e.seq),
				zap.Int("status", se.Status), zap.ByteString("hub_error", se.Body))
			return false, nil
		}
		if err != nil {
			return true, fmt.Errorf("make room in the reported properties: %w", err)
		}
	}
	e.roomMade = true
	q.log.Warn("the hub refused a state change, perhaps for the size of the reported properties; "+
		"withdrew data the agent can do without and sending it again",
		zap.Uint64("seq", e.seq), zap.Int("status", se.Status), zap.ByteString("hub_error", se.Body),
		zap.Int("withdrawn", len(room)), zap.Strings("withdrawn_keys", keyPaths(room, 20)))
	return true, nil
}

// finish removes the delivered head entry from disk and memory.
func (q *Queue) finish(e *entry) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	if !e.durable {
		if e.unsaved {
			// A failed write may have left its file behind (see
			// persistLocked); delivered, it must not be sent again.
			_ = os.Remove(filepath.Join(q.dir, entryName(e.seq)))
		}
		q.popLocked()
		return nil
	}
	if err := q.remove(e); err != nil {
		// Left on disk, a delivered entry would be sent again after a
		// restart and undo newer values the hub already has; so the
		// sender retries the removal before anything else.
		q.log.Error("cannot remove delivered queue entry", zap.Uint64("seq", e.seq), zap.Error(err))
		return err
	}
	q.popLocked()
	return nil
}

func (q *Queue) popLocked() {
	q.entries[0] = nil
	q.entries = q.entries[1:]
	if len(q.entries) == 0 {
		close(q.empty)
	}
}

// keyPaths lists up to limit leaf key paths of a patch, sorted, for logs.
func keyPaths(patch map[string]any, limit int) []string {
	var out []string
	var walk func(m map[string]any, prefix string)
	walk = func(m map[string]any, prefix string) {
		for _, k := range sortedKeys(m) {
			p := joinPath(prefix, k)
			if sub, ok := m[k].(map[string]any); ok && len(sub) > 0 {
				walk(sub, p)
				continue
			}
			if len(out) < limit {
				out = append(out, p)
			}
		}
	}
	walk(patch, "")
	return out
}
