package abpart

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/firmware"
)

// capacity is the size of a slot: the device size for a block device (its
// end, by seeking), the current size for a file (tests make slot files of a
// fixed size, like partitions).
func (i *Installer) capacity(slot string) (int64, error) {
	f, err := os.Open(i.paths[slot])
	if err != nil {
		// Unprivileged, the agent may not open the running slot at all.
		return i.capacityUnopened(slot, fmt.Errorf("abpart: slot %s: %w", slot, err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("abpart: slot %s: %w", slot, err)
	}
	if err := i.checkType(slot, fi); err != nil {
		return 0, err
	}
	if fi.Mode().IsRegular() {
		return fi.Size(), nil
	}
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("abpart: size of slot %s: %w", slot, err)
	}
	return n, nil
}

// checkWritable is the last check before a slot is opened for writing: the
// right type, not the same storage as the other (running) slot, and for a
// block device not the device the root file system is on.
func (i *Installer) checkWritable(target string) (fs.FileInfo, error) {
	fi, err := i.statSlot(target)
	if err != nil {
		return nil, fmt.Errorf("abpart: %w", err)
	}
	other, err := os.Stat(i.paths[otherSlot(target)])
	if err == nil && sameDevice(fi, other) {
		return nil, fmt.Errorf("%w: slot %s (%s) is the same storage as slot %s", ErrActiveSlot, target, i.paths[target], otherSlot(target))
	}
	if fi.Mode()&fs.ModeDevice != 0 {
		if root, err := os.Stat("/"); err == nil {
			rst, ok1 := root.Sys().(*syscall.Stat_t)
			tst, ok2 := fi.Sys().(*syscall.Stat_t)
			if ok1 && ok2 && rst.Dev == tst.Rdev {
				return nil, fmt.Errorf("%w: slot %s (%s) holds the running root file system", ErrActiveSlot, target, i.paths[target])
			}
		}
	}
	return fi, nil
}

// guardWrite is the last word before a slot is opened for writing, kept
// separate from the logic that chose the target so that a mistake there
// cannot reach the running or the committed slot: it reads both again and
// refuses target if it is either. It returns the running slot.
func (i *Installer) guardWrite(ctx context.Context, target string) (string, error) {
	s, err := i.situation(ctx)
	if err != nil {
		return "", err
	}
	if target == s.running {
		return "", fmt.Errorf("%w: slot %s is the running slot", ErrActiveSlot, target)
	}
	if s.env.Slot == target && !s.env.UpgradeAvailable {
		return "", fmt.Errorf("%w: slot %s is the bootloader's committed slot", ErrActiveSlot, target)
	}
	return s.running, nil
}

func otherSlot(s string) string {
	if s == "A" {
		return "B"
	}
	return "A"
}

// Open implements firmware.Installer: the inactive slot, positioned at
// offset. Before opening it checks the running slot and the bootloader's
// committed slot (neither is ever the target), the slot's type, and that the
// declared image fits.
func (i *Installer) Open(ctx context.Context, u firmware.Update, offset int64) (firmware.Sink, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	target, err := i.writeTarget(ctx)
	if err != nil {
		return nil, err
	}
	if rec, ok, err := i.record(u.ID); err != nil {
		return nil, err
	} else if ok && rec.Target != target {
		return nil, fmt.Errorf("%w: update %s was written to slot %s, but slot %s is now the inactive one", ErrInconsistent, u.ID, rec.Target, target)
	}
	before, err := i.checkWritable(target)
	if err != nil {
		return nil, err
	}
	capacity, err := i.capacity(target)
	if err != nil {
		return nil, err
	}
	if u.Request.Size > capacity {
		return nil, fmt.Errorf("%w: size %d bytes, slot %s holds %d", ErrTooLarge, u.Request.Size, target, capacity)
	}
	if offset < 0 || offset > capacity {
		return nil, fmt.Errorf("%w: resume offset %d, slot %s holds %d", ErrTooLarge, offset, target, capacity)
	}
	running, err := i.guardWrite(ctx, target)
	if err != nil {
		return nil, err
	}
	if err := i.saveRecord(record{UpdateID: u.ID, Phase: phaseWriting, From: running, Target: target}); err != nil {
		return nil, err
	}

	flags := os.O_WRONLY
	if i.cfg.SlotType == SlotTypeBlock {
		// On a block device O_EXCL fails with EBUSY while it is mounted or
		// otherwise claimed by the kernel.
		flags |= os.O_EXCL
	}
	f, err := os.OpenFile(i.paths[target], flags, 0)
	if err != nil {
		return nil, fmt.Errorf("abpart: open slot %s for writing: %w", target, err)
	}
	// The path was checked before the open; make sure the open got the same
	// thing (a renamed or replaced node in between is refused).
	after, err := f.Stat()
	if err != nil || !os.SameFile(before, after) {
		f.Close()
		return nil, fmt.Errorf("%w: slot %s changed while it was opened", ErrInconsistent, target)
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("abpart: seek slot %s to %d: %w", target, offset, err)
	}
	i.log.Info("writing slot", zap.String("update_id", u.ID), zap.String("slot", target),
		zap.Int64("offset", offset), zap.Int64("capacity", capacity))
	return &sink{f: f, slot: target, off: offset, capacity: capacity}, nil
}

// sink writes the slot. It refuses a write that would pass the end of the
// slot rather than writing part of it. Sync may run while a Write does (the
// state machine syncs on its own goroutine): it uses only f, whose methods
// are safe for that, and slot, which never changes; off belongs to Write.
type sink struct {
	f        *os.File
	slot     string
	off      int64
	capacity int64
}

func (s *sink) Write(p []byte) (int, error) {
	if s.off+int64(len(p)) > s.capacity {
		return 0, fmt.Errorf("%w: slot %s holds %d bytes and the image goes past that (%d written)", ErrTooLarge, s.slot, s.capacity, s.off)
	}
	n, err := s.f.Write(p)
	s.off += int64(n)
	if err != nil {
		return n, fmt.Errorf("abpart: write slot %s at %d: %w", s.slot, s.off, err)
	}
	return n, nil
}

// Sync makes the written bytes durable with fdatasync: the slot's data (and
// for a file, the block mapping that finds it) is what must survive, not
// its timestamps, and skipping them saves a file system journal commit on
// each of the many checkpoints of a download.
func (s *sink) Sync() error {
	if err := datasync(s.f); err != nil {
		return fmt.Errorf("abpart: fsync slot %s: %w", s.slot, err)
	}
	return nil
}

func datasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}

func (s *sink) Close() error {
	err := datasync(s.f)
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("abpart: close slot %s: %w", s.slot, err)
	}
	return nil
}

// ReadBack implements firmware.ReadBacker: the slot the update was written
// to, read back past the page cache (see storedSlot).
func (i *Installer) ReadBack(ctx context.Context, u firmware.Update) (firmware.StoredImage, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	rec, ok, err := i.record(u.ID)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w %s (no slot was written)", ErrNoSwitch, u.ID)
	}
	return i.openStored(rec.Target)
}

// openStored opens slot for reading back, with a file descriptor of its
// own (the sink may still be writing through another).
func (i *Installer) openStored(slot string) (*storedSlot, error) {
	f, err := i.openReadOnly(slot)
	if err != nil {
		return nil, err
	}
	// The slot is read once, start to end: a larger read-ahead window keeps
	// the storage busy while the reader hashes.
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL); err != nil {
		i.log.Debug("fadvise SEQUENTIAL failed", zap.Error(err))
	}
	return &storedSlot{f: f, slot: slot, log: i.log}, nil
}

// openReadOnly opens slot's device (or file) read-only, checking that it
// is of the kind the installer was set up for.
func (i *Installer) openReadOnly(slot string) (*os.File, error) {
	f, err := os.Open(i.paths[slot])
	if err != nil {
		return nil, fmt.Errorf("abpart: open slot %s: %w", slot, err)
	}
	fi, err := f.Stat()
	if err == nil {
		err = i.checkType(slot, fi)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// storedSlot reads a slot back from the storage. Each section's pages are
// dropped from the page cache first (FADV_DONTNEED), so the read that
// follows goes to the device: the state machine asks only for sections
// that were synced, whose pages are clean, and clean pages are dropped.
// Pages that readahead brings in past the section are dropped in turn when
// their own section comes.
type storedSlot struct {
	f    *os.File
	slot string
	log  *zap.Logger
}

var pageSize = int64(os.Getpagesize())

func (s *storedSlot) Section(off, n int64) (io.Reader, error) {
	// Whole pages: a page that is only partly in the section would stay
	// cached. The state machine's sections start and end on page
	// boundaries (firmware.ReadBackAlign), except the end of the image.
	start := off &^ (pageSize - 1)
	end := (off + n + pageSize - 1) &^ (pageSize - 1)
	if err := unix.Fadvise(int(s.f.Fd()), start, end-start, unix.FADV_DONTNEED); err != nil {
		s.log.Debug("fadvise DONTNEED failed; reading back may come from the page cache", zap.Error(err))
	}
	return io.NewSectionReader(s.f, off, n), nil
}

func (s *storedSlot) Close() error { return s.f.Close() }

// hashSlot returns the hex SHA-256 of the first size bytes of slot, as the
// storage holds them.
func (i *Installer) hashSlot(ctx context.Context, slot string, size int64) (string, error) {
	st, err := i.openStored(slot)
	if err != nil {
		return "", err
	}
	defer st.Close()
	r, err := st.Section(0, size)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	n, err := io.CopyBuffer(h, firmware.ContextReader(ctx, r), buf)
	if err != nil {
		return "", fmt.Errorf("abpart: read slot %s: %w", slot, err)
	}
	if n != size {
		return "", fmt.Errorf("%w: slot %s ends after %d of %d bytes", ErrVerify, slot, n, size)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

var errNoImage = errors.New("abpart: the update has no verified image size and sha256")
