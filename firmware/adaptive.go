package firmware

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware/blockindex"
	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/internal/retry"
)

// Adaptive installs (docs/adaptive-updates.md). When a request names a
// block index (Request.IndexURI) and the installer offers local blocks
// (LocalBlocks), the image is assembled in order into the same Sink as a
// full download: each block is copied from the running slot (found by
// hash), taken from the target slot where an earlier attempt left it, or
// fetched with a bounded HTTP Range request, and verified against the
// index before it is written. Everything after the bytes reach the sink is
// the full download's: checkpoints, read-back, the signature over the
// image, the verifying phase's SHA-256 check. A resumed install continues
// at the checkpoint's block.

// The values of Config.AdaptiveFallback.
const (
	AdaptiveFallbackFull = "full"
	AdaptiveFallbackFail = "fail"
)

// fallbackError is why an adaptive install cannot go on; the policy decides
// between a full download and a failed update.
type fallbackError struct {
	code string // the code of the update's error when the policy fails it
	err  error
}

func (e *fallbackError) Error() string { return e.err.Error() }
func (e *fallbackError) Unwrap() error { return e.err }

func fallback(code string, format string, args ...any) error {
	return &fallbackError{code: code, err: fmt.Errorf(format, args...)}
}

// adaptive assembles the image from the index. done is false (and err nil)
// when the install falls back to the full download, which then continues
// at s.cp.Offset: every byte before it was verified against the index.
func (s *streamer) adaptive(ctx context.Context, u Update) (done bool, err error) {
	m := s.m
	log := m.log.With(zap.String("update_id", u.ID))
	err = s.assemble(ctx, u, log)
	var fe *fallbackError
	if !errors.As(err, &fe) {
		return err == nil, err
	}
	if m.cfg.AdaptiveFallback == AdaptiveFallbackFail {
		log.Error("adaptive install failed (update.adaptiveFallback is fail)", zap.Error(fe))
		return false, coded(fe.code, fmt.Errorf("adaptive install: %w (update.adaptiveFallback is fail)", fe))
	}
	log.Warn("adaptive install falls back to a full download", zap.String("reason", fe.Error()), zap.Int64("bytes", s.cp.Offset))
	s.cp.Fallback = fe.Error()
	s.setAdaptive()
	return false, nil
}

// setAdaptive publishes the counts and fallback reason of the checkpoint
// (Progress.Adaptive); the next progress report carries them.
func (s *streamer) setAdaptive() {
	m := s.m
	m.mu.Lock()
	m.adaptive = &AdaptiveStatus{BytesFetched: s.cp.Fetched, BytesReused: s.cp.Reused, Fallback: s.cp.Fallback}
	m.adaptiveID = s.cp.UpdateID
	m.mu.Unlock()
}

// assemble is the adaptive install proper; a *fallbackError means it
// could not go on.
func (s *streamer) assemble(ctx context.Context, u Update, log *zap.Logger) error {
	m := s.m
	lb, ok := m.cfg.Installer.(LocalBlocks)
	if !ok {
		return fallback(CodeUnsupported, "the installer has no local blocks to reuse")
	}
	if compression(u.Request.URI, "", nil) != "" {
		return fallback(CodeUnsupported, "the image %s is compressed: its ranges are not blocks of the image", redactURI(u.Request.URI))
	}
	ix, err := s.fetchIndex(ctx, u)
	if err != nil {
		return err
	}
	s.cp.Total = ix.ImageSize
	s.setAdaptive()
	if s.cp.Written > ix.ImageSize {
		return coded(CodeVerify, fmt.Errorf("adaptive install: the checkpoint is at byte %d, past the image's %d", s.cp.Written, ix.ImageSize))
	}
	running, target, err := lb.LocalBlocks(ctx, u)
	if err != nil {
		return fallback(CodeUnsupported, "open the local blocks: %v", err)
	}
	defer func() {
		if running != nil {
			running.Close()
		}
		if target != nil {
			target.Close()
		}
	}()

	src, err := s.runningBlocks(ctx, ix, running, log)
	if err != nil {
		return err
	}

	a := &assembler{s: s, ix: ix, url: u.Request.URI, src: src, running: running, target: target,
		buf: make([]byte, ix.BlockSize), fbuf: make([]byte, ix.BlockSize), out: make([]byte, 0, max(copyBufSize, ix.BlockSize))}
	if s.cp.Written > 0 {
		// A resumed install: the run before may have written past its last
		// checkpoint, at most about two checkpoint intervals (the syncer's
		// back-pressure), and those blocks need not be fetched again.
		// Further on the target holds nothing of this update: reading it
		// there would only cost time.
		a.targetEnd = s.cp.Written + 3*m.cfg.CheckpointBytes + int64(ix.BlockSize)
	}
	if err := a.run(ctx); err != nil {
		return err
	}
	if err := m.store.remove(scanFile); err != nil {
		log.Warn("cannot remove the scan of the running image", zap.Error(err))
	}
	log.Info("adaptive install assembled the image", zap.Int64("bytes", ix.ImageSize), zap.Int64("fetched", s.cp.Fetched),
		zap.Int64("reused", s.cp.Reused), zap.Int64("reused_running", a.fromRunning), zap.Int64("reused_target", a.fromTarget),
		zap.Int("ranges", a.ranges), zap.Int("refetched", a.refetched))
	return nil
}

// fetchIndex fetches the block index and authenticates it: its SHA-256 and
// size against the signed metadata when that names them, else its image
// SHA-256 against the request's. The index must also describe the image
// the request names (SHA-256, size). Every failure is a fallback.
func (s *streamer) fetchIndex(ctx context.Context, u Update) (*blockindex.Index, error) {
	req := u.Request
	b, err := s.m.fetchSmall(ctx, req.IndexURI, "block index", blockindex.MaxEncodedSize)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fallback(CodeDownload, "%v", err)
	}
	s.cp.Fetched += int64(len(b))
	where := redactURI(req.IndexURI)
	ix, err := blockindex.Parse(b)
	if err != nil {
		return nil, fallback(CodeVerify, "block index %s: %v", where, err)
	}
	sum := sha256.Sum256(b)
	signed := false
	if len(s.cp.SigText) > 0 {
		// SigText was authenticated before the download (startVerifier).
		if sig, err := signature.ParseSignature(s.cp.SigText); err == nil {
			if man, ok, err := signature.ParseManifest(sig.TrustedComment); err == nil && ok && man.IndexSHA256 != "" {
				if man.IndexSHA256 != hex.EncodeToString(sum[:]) || man.IndexSize != int64(len(b)) {
					return nil, fallback(CodeVerify, "block index %s does not verify: %d bytes with SHA-256 %x, the signed metadata says %d bytes with %s",
						where, len(b), sum, man.IndexSize, man.IndexSHA256)
				}
				signed = true
			}
		}
	}
	switch {
	case req.SHA256 != "" && ix.ImageHex() != req.SHA256:
		return nil, fallback(CodeVerify, "block index %s is for another image: SHA-256 %s, the request names %s", where, ix.ImageHex(), req.SHA256)
	case req.Size > 0 && ix.ImageSize != req.Size:
		return nil, fallback(CodeVerify, "block index %s is for another image: %d bytes, the request names %d", where, ix.ImageSize, req.Size)
	case !signed && req.SHA256 == "":
		return nil, fallback(CodeVerify, "block index %s is not authenticated: neither the signed metadata (indexSha256) nor the request (sha256) vouches for it", where)
	}
	return ix, nil
}

// scanFile keeps where the running image holds each block of the index
// (scanRunning) for a resumed install, so the running slot is read once
// per update, not once per run of the agent. It is removed when the image
// is assembled; a stale one (another update or index) is ignored.
const scanFile = "adaptive-scan.json"

type scanRecord struct {
	Format   int     `json:"format"`
	UpdateID string  `json:"updateId"`
	Index    string  `json:"index"`  // the index's image SHA-256, block size and size
	Blocks   []int32 `json:"blocks"` // scanRunning's result
}

// runningBlocks returns, per block of the index, the block of the running
// image that holds it (-1: none): from the scan file of this update, else
// by scanning the running image and saving the result.
func (s *streamer) runningBlocks(ctx context.Context, ix *blockindex.Index, running LocalImage, log *zap.Logger) ([]int32, error) {
	key := fmt.Sprintf("%s/%d/%d", ix.ImageHex(), ix.BlockSize, ix.ImageSize)
	var rec scanRecord
	if ok, err := s.m.store.readJSON(scanFile, &rec); err == nil && ok && rec.Format == stateFormat &&
		rec.UpdateID == s.cp.UpdateID && rec.Index == key && len(rec.Blocks) == ix.Blocks() {
		log.Info("adaptive install: using the saved scan of the running image")
		return rec.Blocks, nil
	}
	start := time.Now()
	src, found, scanned, err := scanRunning(ctx, ix, running)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, coded(CodeDownload, fmt.Errorf("adaptive install: read the running image: %w", err))
	}
	log.Info("adaptive install: running image scanned", zap.Int64("bytes", scanned), zap.Int("blocks_found", found),
		zap.Int("blocks", ix.Blocks()), zap.Duration("took", time.Since(start)))
	if running != nil {
		rec = scanRecord{Format: stateFormat, UpdateID: s.cp.UpdateID, Index: key, Blocks: src}
		if err := s.m.store.writeJSON(scanFile, rec); err != nil {
			// Only a resume after a restart would read the slot again.
			log.Warn("cannot save the scan of the running image", zap.Error(err))
		}
	}
	return src, nil
}

// scanRunning reads the running image once, block by block at the index's
// block size, and returns for every block of the index the block of the
// running image that holds it (-1: none). Memory besides the index: one
// block buffer, a sorted lookup of 8 bytes per block (a 4-byte hash prefix
// and the block number; the full hash is compared on a hit) and the result
// (4 bytes per block).
func scanRunning(ctx context.Context, ix *blockindex.Index, running LocalImage) (src []int32, found int, scanned int64, err error) {
	n := ix.Blocks()
	src = make([]int32, n)
	for i := range src {
		src[i] = -1
	}
	if running == nil || n == 0 {
		return src, 0, 0, nil
	}
	lk := newHashLookup(ix)
	note := func(h [blockindex.HashSize]byte, block int32) {
		if i := lk.first(h); i >= 0 && src[i] < 0 {
			src[i] = block
		}
	}
	buf := make([]byte, ix.BlockSize)
	bs := int64(ix.BlockSize)
	for off := int64(0); off+bs <= running.Size(); off += bs {
		if err := ctx.Err(); err != nil {
			return nil, 0, scanned, err
		}
		m, err := running.ReadAt(buf, off)
		scanned += int64(m)
		if err != nil && !(err == io.EOF && m == len(buf)) {
			return nil, 0, scanned, fmt.Errorf("at byte %d: %w", off, err)
		}
		note(sha256.Sum256(buf), int32(off/bs))
	}
	// The last block of the image may be short: it can only be where it
	// was.
	lastOff, lastLen := ix.Block(n - 1)
	if lastLen < bs && lastOff+lastLen <= running.Size() {
		if _, err := running.ReadAt(buf[:lastLen], lastOff); err == nil {
			note(sha256.Sum256(buf[:lastLen]), int32(lastOff/bs))
		}
	}
	// A block with the same hash as an earlier block of the image is found
	// where that one is.
	for i := range src {
		if src[i] < 0 {
			if j := lk.first(ix.Hash(i)); j >= 0 && j != i {
				src[i] = src[j]
			}
		}
		if src[i] >= 0 {
			found++
		}
	}
	return src, found, scanned, nil
}

// hashLookup finds the first block of an index with a given hash: the
// blocks sorted by a 4-byte prefix of their hash, then by number, packed
// in one uint64 each.
type hashLookup struct {
	ix   *blockindex.Index
	keys []uint64 // prefix<<32 | block
}

func newHashLookup(ix *blockindex.Index) hashLookup {
	keys := make([]uint64, ix.Blocks())
	for i := range keys {
		h := ix.Hash(i)
		keys[i] = uint64(binary.BigEndian.Uint32(h[:]))<<32 | uint64(i)
	}
	slices.Sort(keys)
	return hashLookup{ix: ix, keys: keys}
}

// first returns the lowest block number whose hash is h, -1 if none.
func (l hashLookup) first(h [blockindex.HashSize]byte) int {
	p := uint64(binary.BigEndian.Uint32(h[:])) << 32
	k, _ := slices.BinarySearch(l.keys, p)
	for ; k < len(l.keys) && l.keys[k]&^0xffffffff == p; k++ {
		if i := int(uint32(l.keys[k])); l.ix.Hash(i) == h {
			return i
		}
	}
	return -1
}

// assembler writes the image block by block, in order, into the stream.
type assembler struct {
	s       *streamer
	ix      *blockindex.Index
	url     string
	src     []int32 // per block: the block of the running image that holds it, -1 if none
	running LocalImage
	target  LocalImage
	// targetEnd bounds the part of the target that may hold blocks of an
	// earlier attempt of this update (0: none).
	targetEnd int64
	buf       []byte // one block, read from the device
	// out holds verified blocks not yet handed to the stream, so the sink
	// is written in large pieces (at most copyBufSize); outFetched and
	// outReused count them until they are.
	out                   []byte
	outFetched, outReused int64
	fbuf                  []byte // one block, fetched

	fromRunning, fromTarget int64 // bytes reused from each
	ranges, refetched       int
}

func (a *assembler) run(ctx context.Context) error {
	if err := a.assemble(ctx); err != nil {
		return err
	}
	return a.flush()
}

func (a *assembler) assemble(ctx context.Context) error {
	s, ix := a.s, a.ix
	bs := int64(ix.BlockSize)
	first := int(s.cp.Written / bs)
	maxRun := int(max(1, s.m.cfg.MaxRangeBytes/bs))
	r0, r1 := first, first // the pending blocks to fetch, [r0, r1)
	for i := first; i < ix.Blocks(); i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, ok, err := a.local(i)
		if err != nil {
			return err
		}
		if !ok {
			if r1-r0 >= maxRun {
				if err := a.fetch(ctx, r0, r1); err != nil {
					return err
				}
				r0 = r1
			}
			if r0 == r1 {
				r0 = i
			}
			r1 = i + 1
			continue
		}
		if r0 < r1 {
			if err := a.fetch(ctx, r0, r1); err != nil {
				return err
			}
		}
		r0, r1 = i+1, i+1
		if err := a.write(i, data, false); err != nil {
			return err
		}
	}
	if r0 < r1 {
		return a.fetch(ctx, r0, r1)
	}
	return nil
}

// local returns block i from the device, verified, when the device holds
// it: in the running image (where the scan found it), else in the target
// at its own offset (left by an earlier attempt).
func (a *assembler) local(i int) ([]byte, bool, error) {
	off, n := a.ix.Block(i)
	b := a.buf[:n]
	if j := a.src[i]; j >= 0 && a.running != nil {
		if _, err := a.running.ReadAt(b, int64(j)*int64(a.ix.BlockSize)); err == nil && a.ix.Verify(i, b) == nil {
			a.fromRunning += n
			return b, true, nil
		}
	}
	if a.target != nil && off+n <= min(a.target.Size(), a.targetEnd) {
		if _, err := a.target.ReadAt(b, off); err == nil && a.ix.Verify(i, b) == nil {
			a.fromTarget += n
			return b, true, nil
		}
	}
	return nil, false, nil
}

// write queues block i (verified) for the stream, skipping what a resumed
// install already wrote of it.
func (a *assembler) write(i int, data []byte, fetched bool) error {
	off, _ := a.ix.Block(i)
	if skip := a.s.cp.Written + int64(len(a.out)) - off; skip > 0 {
		data = data[skip:]
	}
	if len(a.out)+len(data) > cap(a.out) {
		if err := a.flush(); err != nil {
			return err
		}
	}
	a.out = append(a.out, data...)
	if fetched {
		a.outFetched += int64(len(data))
	} else {
		a.outReused += int64(len(data))
	}
	return nil
}

// flush hands the queued blocks to the stream.
func (a *assembler) flush() error {
	if len(a.out) == 0 {
		return nil
	}
	s := a.s
	s.cp.Fetched += a.outFetched
	s.cp.Reused += a.outReused
	a.outFetched, a.outReused = 0, 0
	s.setAdaptive()
	err := s.write(a.out)
	a.out = a.out[:0]
	return err
}

// fetch gets blocks [r0, r1) with one bounded Range request (reconnecting
// from where a broken transfer stopped), verifies each block and writes
// it. A block that does not match its hash is fetched again on its own
// once; a second mismatch fails the update, naming the block.
func (a *assembler) fetch(ctx context.Context, r0, r1 int) error {
	a.ranges++
	start, _ := a.ix.Block(r0)
	lastOff, lastLen := a.ix.Block(r1 - 1)
	rr := a.reader(ctx, start, lastOff+lastLen)
	defer rr.close()
	for i := r0; i < r1; i++ {
		_, n := a.ix.Block(i)
		b := a.fbuf[:n]
		if _, err := io.ReadFull(rr, b); err != nil {
			return a.rangeError(i, err)
		}
		if err := a.ix.Verify(i, b); err != nil {
			a.refetched++
			a.s.m.log.Warn("adaptive install: a fetched block does not match the index; fetching it again",
				zap.String("update_id", a.s.cp.UpdateID), zap.Int("block", i), zap.Error(err))
			if err := a.refetch(ctx, i); err != nil {
				return err
			}
		}
		a.s.cp.ETag, a.s.cp.LastModified = rr.etag, rr.lastModified
		if err := a.write(i, b, true); err != nil {
			return err
		}
	}
	return nil
}

// refetch fetches block i alone into a.fbuf and verifies it.
func (a *assembler) refetch(ctx context.Context, i int) error {
	off, n := a.ix.Block(i)
	rr := a.reader(ctx, off, off+n)
	defer rr.close()
	b := a.fbuf[:n]
	if _, err := io.ReadFull(rr, b); err != nil {
		return a.rangeError(i, err)
	}
	if err := a.ix.Verify(i, b); err != nil {
		return coded(CodeVerify, fmt.Errorf("adaptive install: block %d (bytes %d-%d) from %s does not match the index, also when fetched again: %w",
			i, off, off+n-1, redactURI(a.url), err))
	}
	return nil
}

// reader is a Range reader of the image's bytes [start, end).
func (a *assembler) reader(ctx context.Context, start, end int64) *rangeReader {
	s := a.s
	rr := &rangeReader{
		ctx: ctx, m: s.m, lastByte: time.Now(), url: a.url, offset: start, end: end,
		etag: s.cp.ETag, lastModified: s.cp.LastModified, limit: a.ix.ImageSize, rangeOnly: true,
	}
	rr.backoff = retry.NewBackoff(s.m.cfg.RetryInitialInterval, s.m.cfg.RetryMaxInterval)
	return rr
}

// rangeError explains a Range request that failed at block i: a server
// that ignores Range is a fallback; anything else ends the update, with
// the code of the failure (a range past the image's end or an image of
// another size is verifyFailed).
func (a *assembler) rangeError(i int, err error) error {
	if a.s.ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return err
	}
	off, n := a.ix.Block(i)
	if errors.Is(err, errNoRanges) {
		// Its body is not the block asked for.
		return fallback(CodeVerify, "block %d (bytes %d-%d) from %s: %v", i, off, off+n-1, redactURI(a.url), errNoRanges)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		err = coded(CodeVerify, fmt.Errorf("the server's image ends before the index's %d bytes", a.ix.ImageSize))
	}
	return coded(CodeDownload, fmt.Errorf("adaptive install: block %d (bytes %d-%d): %w", i, off, off+n-1, err))
}
