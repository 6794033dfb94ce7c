package firmware

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
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
	// choice marks a full download chosen because it is cheaper (the
	// device holds too little of the image), not forced: it is taken
	// whatever the policy.
	choice bool
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
	if m.cfg.AdaptiveFallback == AdaptiveFallbackFail && !fe.choice {
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
	ix, ixf, err := s.fetchIndex(ctx, u)
	if ixf != nil {
		defer func() {
			ixf.Close()
			os.Remove(ixf.Name())
		}()
	}
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
	defer src.close()

	// The writer verifies the fetched blocks with its own reader of the
	// index file: an opened index is not safe for concurrent use.
	wix, err := blockindex.Open(ixf, ix.EncodedSize())
	if err != nil {
		return coded(CodeDownload, fmt.Errorf("adaptive install: open the block index again: %w", err))
	}
	a := newAssembler(s, ix, wix, u.Request.URI, src, running, target)
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
	src.close()
	if err := m.store.remove(scanFile); err != nil {
		log.Warn("cannot remove the scan of the running image", zap.Error(err))
	}
	log.Info("adaptive install assembled the image", zap.Int64("bytes", ix.ImageSize), zap.Int64("fetched", s.cp.Fetched),
		zap.Int64("reused", s.cp.Reused), zap.Int64("reused_running", a.fromRunning), zap.Int64("reused_target", a.fromTarget),
		zap.Int("ranges", a.ranges), zap.Int64("bridged", a.bridged), zap.Int("refetched", a.refetched))
	return nil
}

// fetchIndex fetches the block index into indexFile in the state folder
// (hashing it as it arrives) and opens it there, so that the index costs
// no memory in proportion to the image (blockindex.Open), then
// authenticates it: its SHA-256 and size against the signed metadata when
// that names them, else its image SHA-256 against the request's. The index
// must also describe the image the request names (SHA-256, size). Every
// failure is a fallback. The caller closes and removes the file, also
// when err is not nil.
func (s *streamer) fetchIndex(ctx context.Context, u Update) (*blockindex.Index, *os.File, error) {
	req := u.Request
	f, err := os.OpenFile(s.m.store.path(indexFile), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, fallback(CodeDownload, "store the block index: %v", err)
	}
	h := sha256.New()
	var size int64
	err = s.m.fetchSmallTo(ctx, req.IndexURI, "block index", blockindex.MaxEncodedSize, func(r io.Reader) error {
		h.Reset()
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
		if err := f.Truncate(0); err != nil {
			return err
		}
		var err error
		size, err = io.Copy(io.MultiWriter(f, h), r)
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil, f, ctx.Err()
		}
		return nil, f, fallback(CodeDownload, "%v", err)
	}
	s.cp.Fetched += size
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	where := redactURI(req.IndexURI)
	ix, err := blockindex.Open(f, size)
	if err != nil {
		return nil, f, fallback(CodeVerify, "block index %s: %v", where, err)
	}
	signed := false
	if len(s.cp.SigText) > 0 {
		// SigText was authenticated before the download (startVerifier).
		if sig, err := signature.ParseSignature(s.cp.SigText); err == nil {
			if man, ok, err := signature.ParseManifest(sig.TrustedComment); err == nil && ok && man.IndexSHA256 != "" {
				if man.IndexSHA256 != hex.EncodeToString(sum[:]) || man.IndexSize != size {
					return nil, f, fallback(CodeVerify, "block index %s does not verify: %d bytes with SHA-256 %x, the signed metadata says %d bytes with %s",
						where, size, sum, man.IndexSize, man.IndexSHA256)
				}
				signed = true
			}
		}
	}
	switch {
	case req.SHA256 != "" && ix.ImageHex() != req.SHA256:
		return nil, f, fallback(CodeVerify, "block index %s is for another image: SHA-256 %s, the request names %s", where, ix.ImageHex(), req.SHA256)
	case req.Size > 0 && ix.ImageSize != req.Size:
		return nil, f, fallback(CodeVerify, "block index %s is for another image: %d bytes, the request names %d", where, ix.ImageSize, req.Size)
	case !signed && req.SHA256 == "":
		return nil, f, fallback(CodeVerify, "block index %s is not authenticated: neither the signed metadata (indexSha256) nor the request (sha256) vouches for it", where)
	}
	return ix, f, nil
}

// runningBlocks returns, in block order from the checkpoint's block, the
// block of the running image that holds each block of the index (-1:
// none): from the scan file of this update, else by scanning the running
// image (scanRunning), which saves the scan file. On a fresh install
// (nothing assembled yet) where the device holds less than
// Config.AdaptiveMinReuse of the image, it returns a chosen fallback: the
// full download then costs only the index and the scan (or its sample)
// more than a plain one.
func (s *streamer) runningBlocks(ctx context.Context, ix *blockindex.Index, running LocalImage, log *zap.Logger) (*scanSource, error) {
	key := fmt.Sprintf("%s %s/%d/%d", s.cp.UpdateID, ix.ImageHex(), ix.BlockSize, ix.ImageSize)
	first := int(s.cp.Written / int64(ix.BlockSize))
	path := s.m.store.path(scanFile)
	minReuse := s.m.cfg.AdaptiveMinReuse
	if s.cp.Written > 0 {
		minReuse = 0 // already adaptive: go on
	}
	if src, _, ok, err := openScan(path, key, ix.Blocks(), first); err == nil && ok {
		log.Info("adaptive install: using the saved scan of the running image")
		return src, nil
	}
	if running == nil {
		if minReuse > 0 {
			return nil, &fallbackError{code: CodeUnsupported, choice: true,
				err: errors.New("the running slot cannot be read, so nothing of the new image is on the device")}
		}
		return &scanSource{}, nil
	}
	start := time.Now()
	st, err := s.scanRunning(ctx, ix, running, key, minReuse)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, coded(CodeDownload, fmt.Errorf("adaptive install: scan the running image: %w", err))
	}
	share := float64(st.reuse) / float64(max(1, ix.ImageSize))
	if st.sampled {
		log.Info("adaptive install: running image sampled", zap.Int("sample", st.sample), zap.Int("hits", st.hits),
			zap.Int64("bytes", st.scanned), zap.Duration("took", time.Since(start)))
		return nil, &fallbackError{code: CodeUnsupported, choice: true,
			err: fmt.Errorf("the running slot holds about %.1f %% of the new image (%d of %d blocks sampled match), less than the %.1f %% worth an adaptive install",
				100*share, st.hits, st.sample, 100*s.m.cfg.AdaptiveMinReuse)}
	}
	log.Info("adaptive install: running image scanned", zap.Int64("bytes", st.scanned), zap.Int("blocks_found", st.found),
		zap.Int("blocks", ix.Blocks()), zap.Duration("took", time.Since(start)))
	if minReuse > 0 && share < minReuse {
		if err := s.m.store.remove(scanFile); err != nil {
			log.Warn("cannot remove the scan of the running image", zap.Error(err))
		}
		return nil, &fallbackError{code: CodeUnsupported, choice: true,
			err: fmt.Errorf("the running slot holds %.1f %% of the new image, less than the %.1f %% worth an adaptive install", 100*share, 100*minReuse)}
	}
	src, _, ok, err := openScan(path, key, ix.Blocks(), first)
	if err == nil && !ok {
		err = errors.New("it is not there")
	}
	if err != nil {
		return nil, coded(CodeDownload, fmt.Errorf("adaptive install: open the scan of the running image: %w", err))
	}
	return src, nil
}

// maxInFlight bounds the Range requests of an adaptive install in flight
// at once. Scattered changes cost one request per run of changed blocks,
// and on a link with a long round trip (a satellite's 600 ms) one request
// at a time spends the install waiting; a few at a time hide most of it,
// and the blocks still reach the stream in order.
const maxInFlight = 4

// assembler writes the image block by block, in order, into the stream.
// Two goroutines share the work: the planner (plan) walks the blocks,
// reads and verifies the ones the device holds and starts a bounded Range
// request for each run of the others, at most maxInFlight at once, each
// into its own buffer; the writer (the caller of run) takes the local
// blocks and the fetched runs in block order, verifies the fetched blocks
// and hands everything to the stream, so checkpoints only ever count bytes
// written in order. Memory is bounded by the buffers: maxInFlight runs of
// at most Config.MaxRangeBytes and localPieces pieces of local blocks.
type assembler struct {
	s       *streamer
	url     string
	running LocalImage
	target  LocalImage
	// targetEnd bounds the part of the target that may hold blocks of an
	// earlier attempt of this update (0: none).
	targetEnd int64
	first     int // the block the install goes on at

	// Owned by the planner.
	ix                      *blockindex.Index // not safe for concurrent use: the planner's
	src                     *scanSource       // per block, in order: the block of the running image that holds it, -1 if none
	fromRunning, fromTarget int64             // bytes reused from each
	ranges                  int
	// needed counts the bytes fetched because the device does not hold
	// them, bridged those fetched to save a Range request; bridging is
	// the blocks of the gap being bridged still to come.
	needed, bridged int64
	bridging        int

	// Owned by the writer.
	wix *blockindex.Index // the writer's own reader of the same index file
	// out holds verified blocks not yet handed to the stream, so the sink
	// is written in large pieces (at most copyBufSize); outFetched and
	// outReused count them until they are.
	out                   []byte
	outFetched, outReused int64
	refetched             int

	// Free buffers, handed from the writer back to the planner: of runs
	// to fetch (maxInFlight) and of local blocks (localPieces).
	fetchBufs, localBufs chan []byte

	// The image's validators (If-Range), as the first Range request
	// learned them, for the requests after it.
	vmu                sync.Mutex
	etag, lastModified string
}

// localPieces is how many pieces of local blocks (each at most
// copyBufSize, or a block) the planner may read ahead: one between every
// two runs in flight, so that scattered changes do not hold the requests
// back. A piece's buffer grows only as far as its blocks need.
const localPieces = maxInFlight + 1

// piece is the next part of the image, in block order, from the planner to
// the writer: verified local blocks from block first, a run being fetched,
// or the error that stopped the planner.
type piece struct {
	first int
	local []byte
	fetch *rangeFetch
	err   error
}

// rangeFetch is one Range request of blocks [r0, r1) into buf; n, err and
// the validators are set when done is closed.
type rangeFetch struct {
	r0, r1             int
	buf                []byte
	done               chan struct{}
	n                  int
	err                error
	etag, lastModified string
}

func newAssembler(s *streamer, ix, wix *blockindex.Index, url string, src *scanSource, running, target LocalImage) *assembler {
	a := &assembler{s: s, ix: ix, wix: wix, url: url, src: src, running: running, target: target,
		first: int(s.cp.Written / int64(ix.BlockSize)), out: make([]byte, 0, max(copyBufSize, ix.BlockSize)),
		fetchBufs: make(chan []byte, maxInFlight), localBufs: make(chan []byte, localPieces),
		etag: s.cp.ETag, lastModified: s.cp.LastModified}
	for range maxInFlight {
		a.fetchBufs <- nil // allocated when first taken, as large as the run needs
	}
	for range localPieces {
		a.localBufs <- nil
	}
	return a
}

func (a *assembler) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pieces := make(chan piece, maxInFlight+localPieces+1) // never full: every piece but the last holds a buffer
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(pieces)
		if err := a.plan(ctx, pieces, &wg); err != nil {
			select {
			case pieces <- piece{err: err}:
			case <-ctx.Done():
			}
		}
	}()
	err := a.consume(ctx, pieces)
	// Stop the planner and the requests in flight (when the writer
	// stopped early) and wait for them: nothing outlives the install.
	cancel()
	wg.Wait()
	if err != nil {
		return err
	}
	return a.flush()
}

// consume is the writer: it writes the pieces in order until the planner
// is done.
func (a *assembler) consume(ctx context.Context, pieces <-chan piece) error {
	for p := range pieces {
		if p.err != nil {
			return p.err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if f := p.fetch; f != nil {
			err := a.writeFetched(ctx, f)
			a.fetchBufs <- f.buf[:0]
			if err != nil {
				return err
			}
			continue
		}
		err := a.write(p.first, p.local, false)
		a.localBufs <- p.local[:0]
		if err != nil {
			return err
		}
	}
	// The planner closes pieces early only when the context is done.
	return ctx.Err()
}

// plan is the planner: it walks the blocks from a.first and sends the
// pieces of the image in order.
func (a *assembler) plan(ctx context.Context, pieces chan<- piece, wg *sync.WaitGroup) error {
	ix := a.ix
	bs := int64(ix.BlockSize)
	maxRun := int(max(1, a.s.m.cfg.MaxRangeBytes/bs))
	pieceMax := max(copyBufSize, ix.BlockSize) // bytes of local blocks sent at once
	send := func(p piece) error {
		select {
		case pieces <- p:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	var (
		cur      []byte // local blocks from block curFirst, not sent yet
		curFirst int
	)
	sendLocal := func() error {
		if len(cur) == 0 {
			return nil
		}
		p := piece{first: curFirst, local: cur}
		cur = nil
		return send(p)
	}
	r0, r1 := a.first, a.first // the pending blocks to fetch, [r0, r1); while there are any, cur is empty
	for i := a.first; i < ix.Blocks(); i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		j, err := a.src.next()
		if err != nil {
			return coded(CodeDownload, fmt.Errorf("adaptive install: %w", err))
		}
		_, n := ix.Block(i)
		var ok, bridgedHere bool
		if r0 < r1 && r1 == i && a.bridge(i, j, r1-r0, maxRun) {
			a.bridging--
			bridgedHere = true
		} else {
			if cur == nil || len(cur)+int(n) > pieceMax {
				if err := sendLocal(); err != nil {
					return err
				}
				if cur, err = take(ctx, a.localBufs, int(n)); err != nil {
					return err
				}
			}
			cur = slices.Grow(cur, int(n))
			if len(cur) == 0 {
				curFirst = i
			}
			if ok = a.local(i, j, cur[len(cur):int64(len(cur))+n]); ok {
				cur = cur[:int64(len(cur))+n]
			}
		}
		if !ok {
			if !bridgedHere {
				a.needed += n
			}
			if r1-r0 >= maxRun {
				if err := a.startFetch(ctx, r0, r1, send, wg); err != nil {
					return err
				}
				r0 = r1
			}
			if r0 == r1 {
				if err := sendLocal(); err != nil {
					return err
				}
				r0 = i
			}
			r1 = i + 1
			continue
		}
		if r0 < r1 {
			if err := a.startFetch(ctx, r0, r1, send, wg); err != nil {
				return err
			}
		}
		r0, r1 = i+1, i+1
	}
	if r0 < r1 {
		if err := a.startFetch(ctx, r0, r1, send, wg); err != nil {
			return err
		}
	}
	return sendLocal()
}

// take takes a free buffer of at least size bytes, waiting for the writer
// to hand one back.
func take(ctx context.Context, free chan []byte, size int) ([]byte, error) {
	select {
	case b := <-free:
		if cap(b) < size {
			b = make([]byte, 0, size)
		}
		return b[:0], nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Bridging: a short run of blocks the device holds between two runs to
// fetch is fetched too, in the same Range request, when that keeps the
// bytes fetched beyond the changed ones within bridgeShare of those: one
// round trip less for a few blocks more on the wire (the goal is at
// most 1.1 × (changed blocks + index) on the wire).
const (
	bridgeShare = 0.08
	maxBridge   = 4 // blocks
)

// bridge reports whether block i, which the scan found in the running
// image (j >= 0), is fetched with the pending run of run blocks ending at
// i instead: a.bridging counts down the blocks of a gap being bridged.
func (a *assembler) bridge(i int, j int32, run, maxRun int) bool {
	if a.bridging > 0 {
		return true
	}
	if j < 0 || a.targetEnd > 0 {
		return false // a block to fetch anyway; or a resume, where the target may hold blocks the scan does not know
	}
	bs := int64(a.ix.BlockSize)
	for g := 1; g <= maxBridge && i+g < a.ix.Blocks() && run+g < maxRun; g++ {
		v, ok := a.src.peek(g - 1)
		if !ok {
			return false
		}
		if v >= 0 {
			continue
		}
		// Blocks i to i+g-1 are the gap, block i+g is fetched.
		if float64(a.bridged+int64(g)*bs) > bridgeShare*float64(a.needed+int64(run)*bs) {
			return false
		}
		a.bridged += int64(g) * bs
		a.bridging = g
		return true
	}
	return false
}

// local reads block i into b and reports whether the device holds it,
// verified: in the running image (at block j, where the scan found it),
// else in the target at its own offset (left by an earlier attempt).
func (a *assembler) local(i int, j int32, b []byte) bool {
	off, n := a.ix.Block(i)
	if j >= 0 && a.running != nil {
		if _, err := a.running.ReadAt(b, int64(j)*int64(a.ix.BlockSize)); err == nil && a.ix.Verify(i, b) == nil {
			a.fromRunning += n
			return true
		}
	}
	if a.target != nil && off+n <= min(a.target.Size(), a.targetEnd) {
		if _, err := a.target.ReadAt(b, off); err == nil && a.ix.Verify(i, b) == nil {
			a.fromTarget += n
			return true
		}
	}
	return false
}

// write queues verified blocks from block i for the stream, skipping what
// a resumed install already wrote of them.
func (a *assembler) write(i int, data []byte, fetched bool) error {
	off, _ := a.wix.Block(i)
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

// startFetch starts the Range request of blocks [r0, r1) (reconnecting
// from where a broken transfer stopped) and sends it to the writer. It
// waits for a free buffer: at most maxInFlight runs are fetched or wait
// to be written.
func (a *assembler) startFetch(ctx context.Context, r0, r1 int, send func(piece) error, wg *sync.WaitGroup) error {
	a.ranges++
	start, _ := a.ix.Block(r0)
	lastOff, lastLen := a.ix.Block(r1 - 1)
	end := lastOff + lastLen
	buf, err := take(ctx, a.fetchBufs, int(end-start))
	if err != nil {
		return err
	}
	f := &rangeFetch{r0: r0, r1: r1, buf: buf[:end-start], done: make(chan struct{})}
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(f.done)
		a.vmu.Lock()
		etag, lastModified := a.etag, a.lastModified
		a.vmu.Unlock()
		rr := a.reader(ctx, start, end, etag, lastModified)
		defer rr.close()
		f.n, f.err = io.ReadFull(rr, f.buf)
		f.etag, f.lastModified = rr.etag, rr.lastModified
		a.vmu.Lock()
		if a.etag == "" && a.lastModified == "" {
			a.etag, a.lastModified = rr.etag, rr.lastModified
		}
		a.vmu.Unlock()
	}()
	return send(piece{fetch: f})
}

// writeFetched waits for a run's Range request, verifies each block and
// writes it. A block that does not match its hash is fetched again on its
// own once; a second mismatch fails the update, naming the block. A
// request that failed fails at the first block it did not bring, after
// the blocks before it are written.
func (a *assembler) writeFetched(ctx context.Context, f *rangeFetch) error {
	<-f.done // the request ends when ctx is done
	start, _ := a.wix.Block(f.r0)
	for i := f.r0; i < f.r1; i++ {
		off, n := a.wix.Block(i)
		lo := off - start
		if lo+n > int64(f.n) {
			return a.rangeError(i, f.err)
		}
		b := f.buf[lo : lo+n]
		if err := a.wix.Verify(i, b); err != nil {
			a.refetched++
			a.s.m.log.Warn("adaptive install: a fetched block does not match the index; fetching it again",
				zap.String("update_id", a.s.cp.UpdateID), zap.Int("block", i), zap.Error(err))
			if err := a.refetch(ctx, i, b); err != nil {
				return err
			}
		}
		a.s.cp.ETag, a.s.cp.LastModified = f.etag, f.lastModified
		if err := a.write(i, b, true); err != nil {
			return err
		}
	}
	return nil
}

// refetch fetches block i alone into b and verifies it.
func (a *assembler) refetch(ctx context.Context, i int, b []byte) error {
	off, n := a.wix.Block(i)
	rr := a.reader(ctx, off, off+n, a.s.cp.ETag, a.s.cp.LastModified)
	defer rr.close()
	if _, err := io.ReadFull(rr, b); err != nil {
		return a.rangeError(i, err)
	}
	if err := a.wix.Verify(i, b); err != nil {
		return coded(CodeVerify, fmt.Errorf("adaptive install: block %d (bytes %d-%d) from %s does not match the index, also when fetched again: %w",
			i, off, off+n-1, redactURI(a.url), err))
	}
	return nil
}

// reader is a Range reader of the image's bytes [start, end), sent with
// the image's validators.
func (a *assembler) reader(ctx context.Context, start, end int64, etag, lastModified string) *rangeReader {
	s := a.s
	rr := &rangeReader{
		ctx: ctx, m: s.m, lastByte: time.Now(), url: a.url, offset: start, end: end,
		etag: etag, lastModified: lastModified, limit: a.wix.ImageSize, rangeOnly: true,
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
	off, n := a.wix.Block(i)
	if errors.Is(err, errNoRanges) {
		// Its body is not the block asked for.
		return fallback(CodeVerify, "block %d (bytes %d-%d) from %s: %v", i, off, off+n-1, redactURI(a.url), errNoRanges)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		err = coded(CodeVerify, fmt.Errorf("the server's image ends before the index's %d bytes", a.wix.ImageSize))
	}
	return coded(CodeDownload, fmt.Errorf("adaptive install: block %d (bytes %d-%d): %w", i, off, off+n-1, err))
}

// DefaultAdaptiveMinReuse is Config.AdaptiveMinReuse's default: an
// adaptive install that can reuse less than 3 % of the image saves at most
// about 2 % of the bytes once the index (0.78 % of the image at 4 KiB
// blocks) is paid for, and what is left to fetch is then scattered, one
// Range request per run of changed blocks. A full download is faster.
const DefaultAdaptiveMinReuse = 0.03
