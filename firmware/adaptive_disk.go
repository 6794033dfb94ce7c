package firmware

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/google/renameio/v2"

	"github.com/gwagent/gwagent/firmware/blockindex"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// The state an adaptive install keeps on disk rather than in memory, so
// that its memory does not grow with the image (docs/adaptive-updates.md):
// the fetched index (read back with pread, blockindex.Open), a lookup of
// the index's block hashes (an open-addressing hash table file, probed and
// written with pread/pwrite) and the scan of the running image (a compact
// binary file, read in order while assembling). os.File reads and writes,
// not mmap: mapped pages would count in the agent's RSS.
const (
	// indexFile is the fetched block index; fetched again by every run.
	indexFile = "adaptive-index.bidx"
	// lookupFile is the hash table of the scan; removed after it.
	lookupFile = "adaptive-lookup.tmp"
	// scanFile keeps where the running image holds each block of the
	// index for a resumed install, so the running slot is read once per
	// update, not once per run of the agent. It is removed when the image
	// is assembled; a stale one (another update or index) is ignored.
	scanFile = "adaptive-scan.bin"
)

// lookupTable maps the first 8 bytes of a block hash of the index to the
// block of the running image found to hold it: slots of 12 bytes (the
// 8-byte hash prefix, then a uint32 that is 0 for an empty slot, 1 for a
// hash not found yet, 2+j for block j of the running image), twice as many
// slots as blocks (rounded up to a power of two), linear probing. The
// prefix is only a lookup key: a block the table points to is checked
// against its full hash before it is used, so a prefix collision costs a
// fetch, never a wrong block.
//
// A table of up to memTableBytes is kept in memory instead (the same
// bytes): a constant bound, and the file's system calls would cost more
// than the small images they serve save.
type lookupTable struct {
	f     tableFile
	slots uint64
	buf   [probeSlots * slotSize]byte
}

type tableFile interface {
	io.ReaderAt
	io.WriterAt
	Close() error
}

// memTableBytes bounds a lookup table kept in memory: 43690 blocks, an
// image of 170 MiB at 4 KiB blocks.
const memTableBytes = 1 << 20

// memTable is a tableFile in memory.
type memTable []byte

func (m memTable) ReadAt(p []byte, off int64) (int, error)  { return copy(p, m[off:]), nil }
func (m memTable) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }
func (memTable) Close() error                               { return nil }

const (
	slotSize   = 12
	probeSlots = 8 // slots read at once (a probe rarely needs more)
)

func newLookupTable(path string, blocks int) (*lookupTable, error) {
	slots := uint64(1) << bits.Len64(uint64(max(2*blocks, probeSlots))-1)
	if slots*slotSize <= memTableBytes {
		return &lookupTable{f: make(memTable, slots*slotSize), slots: slots}, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(int64(slots * slotSize)); err != nil {
		f.Close()
		return nil, err
	}
	return &lookupTable{f: f, slots: slots}, nil
}

func (t *lookupTable) close() error { return t.f.Close() }

func prefix(h [blockindex.HashSize]byte) uint64 { return binary.BigEndian.Uint64(h[:8]) }

// probe returns the position of the slot holding prefix p, or of the empty
// slot where it would go, and that slot's value (0: empty).
func (t *lookupTable) probe(p uint64) (pos int64, val uint32, err error) {
	at := p & (t.slots - 1)
	for {
		n := min(probeSlots, t.slots-at)
		b := t.buf[:n*slotSize]
		if _, err := t.f.ReadAt(b, int64(at*slotSize)); err != nil {
			return 0, 0, err
		}
		for k := range n {
			s := b[k*slotSize:]
			v := binary.BigEndian.Uint32(s[8:])
			if v == 0 || binary.BigEndian.Uint64(s) == p {
				return int64((at + k) * slotSize), v, nil
			}
		}
		at = (at + n) & (t.slots - 1)
	}
}

// insert adds prefix p, not found yet, unless it is there (dup).
func (t *lookupTable) insert(p uint64) (dup bool, err error) {
	pos, v, err := t.probe(p)
	if err != nil || v != 0 {
		return v != 0, err
	}
	var s [slotSize]byte
	binary.BigEndian.PutUint64(s[:], p)
	binary.BigEndian.PutUint32(s[8:], 1)
	_, err = t.f.WriteAt(s[:], pos)
	return false, err
}

// note records that block j of the running image has a hash with prefix
// p, unless another block was found to have it before; it reports whether
// the index has that prefix.
func (t *lookupTable) note(p uint64, j int) (bool, error) {
	pos, v, err := t.probe(p)
	if err != nil || v != 1 {
		return v != 0, err
	}
	var s [4]byte
	binary.BigEndian.PutUint32(s[:], uint32(j)+2)
	_, err = t.f.WriteAt(s[:], pos+8)
	return err == nil, err
}

// find returns the block of the running image found to hold prefix p, -1
// if none.
func (t *lookupTable) find(p uint64) (int32, error) {
	_, v, err := t.probe(p)
	if err != nil || v < 2 {
		return -1, err
	}
	return int32(v - 2), nil
}

// sampleBlocks is how many blocks of the running image are read first to
// estimate what it holds of the new image: one at a random offset in each
// of sampleBlocks equal strata, so a share concentrated in one region is
// sampled in proportion to its size. At a true share of 3 % (the default
// minimum) the sample expects 31 hits, and falls below half that with a
// probability of about 0.1 %. A running image of fewer than 8·sampleBlocks
// blocks (large blocks) is sampled in an eighth of its blocks, at least
// minSample: at 128 the chance to give up at a true share of 3 % is about
// 10 % (costing at most those 3 % more bytes), at 10 % below 0.01 %.
const (
	sampleBlocks = 1024
	minSample    = 128
)

// scanStats is what a scan of the running image found.
type scanStats struct {
	scanned int64 // bytes of the running image read
	found   int   // blocks of the index found
	reuse   int64 // bytes of the image they make
	sampled bool  // the sample decided: the rest was not read
	sample  int   // blocks sampled, and hits among them
	hits    int
}

// scanRunning reads the running image once, block by block at the index's
// block size, and writes for every block of the index the block of the
// running image that holds it (-1: none) to the scan file. With minReuse >
// 0 it first reads a sample of the running image and stops when the
// sample's estimate of the reusable share of the image is below half of
// minReuse (stats.sampled). Memory: two blocks and a few buffers, whatever
// the image size.
func (s *streamer) scanRunning(ctx context.Context, ix *blockindex.Index, running LocalImage, key string, minReuse float64) (st scanStats, err error) {
	n := ix.Blocks()
	bs := int64(ix.BlockSize)
	t, err := newLookupTable(s.m.store.path(lookupFile), n)
	if err != nil {
		return st, fmt.Errorf("create the lookup of the index's blocks: %w", err)
	}
	defer func() {
		t.close()
		os.Remove(s.m.store.path(lookupFile))
	}()
	dups := 0 // blocks of the index with the hash of an earlier one
	for i := range n {
		if i%4096 == 0 && ctx.Err() != nil {
			return st, ctx.Err()
		}
		dup, err := t.insert(prefix(ix.Hash(i)))
		if err != nil {
			return st, fmt.Errorf("write the lookup of the index's blocks: %w", err)
		}
		if dup {
			dups++
		}
	}
	if err := ix.Err(); err != nil {
		return st, err
	}

	var runBlocks int64
	if running != nil {
		runBlocks = running.Size() / bs
	}
	buf := make([]byte, ix.BlockSize)
	read := func(j int64) error {
		m, err := running.ReadAt(buf, j*bs)
		st.scanned += int64(m)
		if err != nil && !(err == io.EOF && m == len(buf)) {
			return fmt.Errorf("read the running image at byte %d: %w", j*bs, err)
		}
		return nil
	}
	var sample []int64
	if ns := min(sampleBlocks, runBlocks/8); minReuse > 0 && ns >= minSample {
		stride := runBlocks / ns
		r := rand.New(rand.NewPCG(uint64(runBlocks), uint64(n)))
		sample = make([]int64, ns)
		for k := range sample {
			j := int64(k)*stride + r.Int64N(stride)
			sample[k] = j
			if err := read(j); err != nil {
				return st, err
			}
			ok, err := t.note(prefix(sha256.Sum256(buf)), int(j))
			if err != nil {
				return st, err
			}
			if ok {
				st.hits++
			}
		}
		st.sample = int(ns)
		// Each hit stands for stride blocks of the running image, each
		// holding a block of the index. That can miss a block the new
		// image repeats (zeros, say) and the running image holds rarely,
		// so the blocks of the index whose hash is repeated count as
		// found: at most 2·dups of them.
		est := float64(st.hits) * float64(stride*bs) / float64(ix.ImageSize)
		if est+float64(2*dups)/float64(n) < minReuse/2 {
			st.sampled = true
			st.reuse = int64(est * float64(ix.ImageSize))
			return st, nil
		}
	}
	for j, k := int64(0), 0; j < runBlocks; j++ {
		if k < len(sample) && sample[k] == j {
			k++
			continue
		}
		if j%1024 == 0 && ctx.Err() != nil {
			return st, ctx.Err()
		}
		if err := read(j); err != nil {
			return st, err
		}
		if _, err := t.note(prefix(sha256.Sum256(buf)), int(j)); err != nil {
			return st, err
		}
	}
	// The last block of the image may be short: it can only be where it
	// was.
	if lastOff, lastLen := ix.Block(n - 1); n > 0 && lastLen < bs && running != nil && lastOff+lastLen <= running.Size() {
		if _, err := running.ReadAt(buf[:lastLen], lastOff); err == nil {
			if _, err := t.note(prefix(sha256.Sum256(buf[:lastLen])), int(lastOff/bs)); err != nil {
				return st, err
			}
		}
	}

	// The result, in block order; a block with the same hash as an earlier
	// block of the image is found where that one is.
	return st, writeScan(s.m.store.path(scanFile), key, n, func(w func(int32) error) (int, error) {
		for i := range n {
			j, err := t.find(prefix(ix.Hash(i)))
			if err != nil {
				return 0, err
			}
			if j >= 0 {
				st.found++
				_, l := ix.Block(i)
				st.reuse += l
			}
			if err := w(j); err != nil {
				return 0, err
			}
		}
		return st.found, ix.Err()
	})
}

// The scan file: scanMagic, the key's length (uint32) and the key (the
// update and the index), the number of blocks and of blocks found
// (uint32 each), then one int32 per block (-1: not in the running image),
// big-endian. It is written atomically; a file of the wrong length is
// ignored.
const scanMagic = "GWSCAN01"

func scanHeader(key string, n, found int) []byte {
	h := append([]byte(scanMagic), 0, 0, 0, 0)
	binary.BigEndian.PutUint32(h[8:], uint32(len(key)))
	h = append(h, key...)
	h = binary.BigEndian.AppendUint32(h, uint32(n))
	return binary.BigEndian.AppendUint32(h, uint32(found))
}

// writeScan writes the scan file of n blocks, the values from fill (which
// returns the number found), and fsyncs it.
func writeScan(path, key string, n int, fill func(w func(int32) error) (int, error)) error {
	pf, err := renameio.NewPendingFile(path, renameio.WithPermissions(0o600), renameio.WithTempDir(filepath.Dir(path)))
	if err != nil {
		return fmt.Errorf("save the scan of the running image: %w", err)
	}
	defer pf.Cleanup()
	hdr := scanHeader(key, n, 0)
	bw := bufio.NewWriterSize(pf, 64<<10)
	if _, err := bw.Write(hdr); err != nil {
		return fmt.Errorf("save the scan of the running image: %w", err)
	}
	var b [4]byte
	found, err := fill(func(v int32) error {
		binary.BigEndian.PutUint32(b[:], uint32(v))
		_, err := bw.Write(b[:])
		return err
	})
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		// The count of blocks found is known at the end.
		_, err = pf.WriteAt(binary.BigEndian.AppendUint32(nil, uint32(found)), int64(len(hdr)-4))
	}
	if err == nil {
		err = pf.CloseAtomicallyReplace()
	}
	if err == nil {
		err = atomicfile.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		return fmt.Errorf("save the scan of the running image: %w", err)
	}
	return nil
}

// scanSource reads the scan's values in block order.
type scanSource struct {
	f *os.File // nil: no block is in the running image
	r *bufio.Reader
}

// openScan opens the scan file of key and n blocks at block first; ok is
// false when there is none that fits.
func openScan(path, key string, n, first int) (src *scanSource, found int, ok bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, false, nil
	}
	if err != nil {
		return nil, 0, false, err
	}
	want := scanHeader(key, n, 0)
	hdr := make([]byte, len(want))
	fi, err := f.Stat()
	if err != nil || fi.Size() != int64(len(want))+4*int64(n) {
		f.Close()
		return nil, 0, false, err
	}
	if _, err := f.ReadAt(hdr, 0); err != nil || string(hdr[:len(hdr)-4]) != string(want[:len(want)-4]) {
		f.Close()
		return nil, 0, false, nil
	}
	found = int(binary.BigEndian.Uint32(hdr[len(hdr)-4:]))
	if _, err := f.Seek(int64(len(hdr))+4*int64(first), io.SeekStart); err != nil {
		f.Close()
		return nil, 0, false, err
	}
	return &scanSource{f: f, r: bufio.NewReaderSize(f, 16<<10)}, found, true, nil
}

// next is the value of the next block.
func (s *scanSource) next() (int32, error) {
	if s.f == nil {
		return -1, nil
	}
	var b [4]byte
	if _, err := io.ReadFull(s.r, b[:]); err != nil {
		return -1, fmt.Errorf("read the scan of the running image: %w", err)
	}
	return int32(binary.BigEndian.Uint32(b[:])), nil
}

// peek is the value k blocks after the next one (k=0: the next), without
// consuming it; ok is false past the end. k must be below 4096.
func (s *scanSource) peek(k int) (v int32, ok bool) {
	if s.f == nil {
		return -1, true
	}
	b, err := s.r.Peek(4 * (k + 1))
	if err != nil {
		return 0, false
	}
	return int32(binary.BigEndian.Uint32(b[4*k:])), true
}

func (s *scanSource) close() {
	if s.f != nil {
		s.f.Close()
	}
}
