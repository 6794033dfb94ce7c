package firmware

import (
	"context"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"sync"

	"go.uber.org/zap"
)

// stepVerifying checks the finished download against the request (size,
// SHA-256, signature) and, when the backend can read back, the stored image
// against what was written. The SHA-256 the request names is compared with
// the bytes as the storage holds them when the stream did not hash them
// itself (see streamHashes).
func (m *Manager) stepVerifying(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	rec := m.rec
	m.mu.Unlock()
	cp, ok, err := m.finishedDownload(rec)
	if err != nil {
		return "", err
	}
	if !ok {
		return PhaseDownloading, nil
	}
	req := rec.Request
	if req.Size > 0 && cp.Offset != req.Size {
		return "", coded(CodeVerify, fmt.Errorf("size mismatch: want %d bytes, got %d", req.Size, cp.Offset))
	}
	u := rec.update()
	u.ImageSize = cp.Written
	rb, readsBack := m.cfg.Installer.(ReadBacker)
	var stored readBackResult
	if readsBack {
		if stored, err = m.storedImage(ctx, rb, u); err != nil {
			return "", err
		}
	}
	if u.ImageSHA256, err = imageSum(cp, stored, readsBack); err != nil {
		return "", err
	}
	raw := u.ImageSHA256
	if cp.Compressed {
		if raw, err = sumOf(cp.RawHash); err != nil {
			return "", err
		}
	}
	if req.SHA256 != "" && raw != req.SHA256 {
		where := ""
		if len(cp.ImgHash) == 0 {
			where = " (over the image as read back from the storage)"
		}
		return "", coded(CodeVerify, fmt.Errorf("sha256 mismatch: want %s, got %s%s", req.SHA256, raw, where))
	}
	if err := m.checkSignature(rec, cp); err != nil {
		return "", err
	}
	if err := m.persist(ctx, func(r *record) {
		r.ImageSize, r.ImageSHA256 = u.ImageSize, u.ImageSHA256
		r.Bytes, r.Total = cp.Offset, cp.Total
	}); err != nil {
		return "", err
	}
	if readsBack {
		// Lets the Apply that follows in this run skip hashing the stored
		// image again (Update.ReadBackVerified).
		m.mu.Lock()
		m.readBack = u.ID
		m.mu.Unlock()
	}
	m.log.Info("image verified", zap.String("update_id", rec.UpdateID), zap.Int64("bytes", u.ImageSize),
		zap.String("sha256", u.ImageSHA256))
	return m.windowPhase(), nil
}

// finishedDownload returns the final checkpoint of rec's download. ok is
// false when the download must run (again): its record is gone (e.g. lost
// with a power cut before the directory fsync), or it holds no hash of the
// written bytes and the installer can no longer read them back.
func (m *Manager) finishedDownload(rec record) (checkpoint, bool, error) {
	var cp checkpoint
	ok, err := m.store.readJSON(checkpointFile, &cp)
	if err != nil {
		return cp, false, err
	}
	log := m.log.With(zap.String("update_id", rec.UpdateID))
	if !ok || !cp.Done || cp.UpdateID != rec.UpdateID {
		log.Warn("download checkpoint missing; downloading again")
		return cp, false, nil
	}
	if _, readsBack := m.cfg.Installer.(ReadBacker); len(cp.ImgHash) == 0 && !readsBack {
		log.Warn("the download was not hashed and the installer cannot read it back; downloading again")
		return cp, false, m.store.remove(checkpointFile)
	}
	return cp, true, nil
}

// imageSum is the SHA-256 of the image as written: from the stream's hash
// when it hashed (then the stored image must match it), else the stored
// image's own. The stored size must be the written size.
func imageSum(cp checkpoint, stored readBackResult, readsBack bool) (string, error) {
	if readsBack && stored.n != cp.Written {
		return "", coded(CodeVerify, fmt.Errorf("read back: stored image has %d bytes, wrote %d", stored.n, cp.Written))
	}
	if len(cp.ImgHash) == 0 {
		return stored.sum, nil
	}
	written, err := sumOf(cp.ImgHash)
	if err != nil {
		return "", err
	}
	if readsBack && stored.sum != written {
		return "", coded(CodeVerify, fmt.Errorf("read back: sha256 mismatch: wrote %s, stored %s", written, stored.sum))
	}
	return written, nil
}

// sumOf is the hex SHA-256 of a saved hash state.
func sumOf(state []byte) (string, error) {
	h, err := restoreHash(state)
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// readBackResult is what reading the stored image back found: its size and
// SHA-256 as the storage holds it. Memory only: after a restart the image is
// read back again.
type readBackResult struct {
	updateID string
	n        int64
	sum      string
}

// storedImage is the size and SHA-256 of the image as the storage holds
// it: from the read-back made behind the download in this run when there is
// one, else (the agent restarted since) from reading it all back now.
func (m *Manager) storedImage(ctx context.Context, rb ReadBacker, u Update) (readBackResult, error) {
	m.mu.Lock()
	res := m.backRead
	m.backRead = readBackResult{}
	m.mu.Unlock()
	if res.updateID == u.ID {
		return res, nil
	}
	return readBackNow(ctx, rb, u)
}

// readBackNow reads the whole stored image of u back and hashes it.
func readBackNow(ctx context.Context, rb ReadBacker, u Update) (readBackResult, error) {
	img, err := rb.ReadBack(ctx, u)
	if err != nil {
		return readBackResult{}, coded(CodeVerify, fmt.Errorf("read back: %w", err))
	}
	b := startBackReader(ctx, img, 0)
	res, err := b.finish(u.ID, u.ImageSize)
	if cerr := b.stop(); err == nil {
		err = cerr
	}
	return res, err
}

// backReader reads the stored image back and hashes it behind the
// download: each time the syncer has made more of the image durable
// (advance) it reads the new part, so reading the storage overlaps
// downloading and writing instead of following them, and finish waits only
// for the last part. It reads whole ReadBackAlign units until the image is
// complete, so a section never shares a page with bytes that are not yet
// durable.
//
// Two goroutines do the work: one reads sections into a few fixed buffers,
// the other hashes them, so reading the storage and hashing overlap instead
// of taking turns. Memory use is readAheadBufs buffers, whatever the image
// size.
//
// A download resumed after a restart reads back from byte 0, not from a
// hash state saved in the checkpoint: what was read back before the crash
// vouches for the storage before the crash, and re-reading the synced part
// costs one sequential read that overlaps the rest of the download.
type backReader struct {
	img    StoredImage
	ctx    context.Context
	cancel context.CancelFunc
	wake   chan struct{} // capacity 1: durable or final changed
	done   chan struct{} // closed when both goroutines have returned

	mu      sync.Mutex // guards durable and final
	durable int64      // the first durable bytes of the image are on the storage
	final   bool       // durable is the whole image

	// Owned by the hashing goroutine; read by others only after done is
	// closed.
	hash hash.Hash
	n    int64 // bytes read back and hashed
	err  error
}

// readAheadBufs is how many copyBufSize buffers a read-back keeps in
// flight: enough for the storage to deliver the next ones while one is
// hashed, few enough that memory use stays small and fixed.
const readAheadBufs = 4

// chunk is a piece of the stored image on its way from the reading to the
// hashing goroutine, or the error that ended the reading.
type chunk struct {
	b   []byte
	err error
}

// startBackReader starts reading img back; its first durable bytes are
// already on the storage.
func startBackReader(ctx context.Context, img StoredImage, durable int64) *backReader {
	ctx, cancel := context.WithCancel(ctx)
	b := &backReader{img: img, ctx: ctx, cancel: cancel, wake: make(chan struct{}, 1), done: make(chan struct{}),
		durable: durable, hash: newHash()}
	// Every buffer is in free, in full or being used, so neither channel
	// is ever full when a goroutine sends.
	full := make(chan chunk, readAheadBufs)
	free := make(chan []byte, readAheadBufs)
	for range readAheadBufs {
		free <- make([]byte, copyBufSize)
	}
	var wg sync.WaitGroup
	wg.Go(func() { b.readAll(full, free) })
	go func() {
		b.hashAll(full, free)
		wg.Wait()
		close(b.done)
	}()
	return b
}

// advance says the first n bytes of the image are durable. It never blocks.
func (b *backReader) advance(n int64) {
	b.mu.Lock()
	b.durable = max(b.durable, n)
	b.mu.Unlock()
	b.poke()
}

func (b *backReader) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// finish says the image is complete and durable at n bytes and waits until
// all of it has been read back (or the storage ended early).
func (b *backReader) finish(updateID string, n int64) (readBackResult, error) {
	b.mu.Lock()
	b.durable, b.final = n, true
	b.mu.Unlock()
	b.poke()
	<-b.done
	if b.err != nil {
		return readBackResult{}, b.err
	}
	return readBackResult{updateID: updateID, n: b.n, sum: hex.EncodeToString(b.hash.Sum(nil))}, nil
}

// failed is the error that ended the reading early, or nil while it goes on.
func (b *backReader) failed() error {
	select {
	case <-b.done:
		return b.err
	default:
		return nil
	}
}

// stop ends the reading, waits for it and closes the stored image. It may
// be called more than once.
func (b *backReader) stop() error {
	b.cancel()
	<-b.done
	if b.img == nil {
		return nil
	}
	err := b.img.Close()
	b.img = nil
	if err != nil {
		return coded(CodeVerify, fmt.Errorf("read back: close: %w", err))
	}
	return nil
}

// hashAll hashes what readAll delivers until it closes full.
func (b *backReader) hashAll(full <-chan chunk, free chan<- []byte) {
	for c := range full {
		if c.err != nil {
			b.err = c.err
			continue
		}
		b.hash.Write(c.b)
		b.n += int64(len(c.b))
		free <- c.b[:cap(c.b)]
	}
}

// readAll reads the image in the order it becomes durable, until the end
// of the image, the end of the storage, an error or cancellation.
func (b *backReader) readAll(full chan<- chunk, free <-chan []byte) {
	defer close(full)
	var pos int64
	for {
		end, final, err := b.next(pos)
		if err != nil {
			full <- chunk{err: err}
			return
		}
		if end > pos {
			k, err := b.readSection(pos, end-pos, full, free)
			pos += k
			if err != nil {
				full <- chunk{err: coded(CodeVerify, fmt.Errorf("read back at byte %d: %w", pos, err))}
				return
			}
			if pos < end {
				return // the storage ends early: the size check says so
			}
		}
		if final {
			return
		}
	}
}

// next waits until there is more to read than the first pos bytes and
// returns where to read up to.
func (b *backReader) next(pos int64) (end int64, final bool, err error) {
	for {
		b.mu.Lock()
		end, final = b.durable, b.final
		b.mu.Unlock()
		if !final {
			end -= end % ReadBackAlign
		}
		if end > pos || final {
			return end, final, nil
		}
		select {
		case <-b.wake:
		case <-b.ctx.Done():
			return 0, false, b.ctx.Err()
		}
	}
}

// readSection sends the n bytes at off as the storage holds them to the
// hashing goroutine and returns how many there were.
func (b *backReader) readSection(off, n int64, full chan<- chunk, free <-chan []byte) (int64, error) {
	sr, err := b.img.Section(off, n)
	if err != nil {
		return 0, err
	}
	r := ContextReader(b.ctx, sr)
	var got int64
	for got < n {
		var buf []byte
		select {
		case buf = <-free:
		case <-b.ctx.Done():
			return got, b.ctx.Err()
		}
		k, err := io.ReadFull(r, buf[:min(int64(len(buf)), n-got)])
		got += int64(k)
		if k > 0 {
			full <- chunk{b: buf[:k]}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
	return got, nil
}

// ContextReader stops a long read (a slot read back, say) once ctx is done.
func ContextReader(ctx context.Context, r io.Reader) io.Reader { return ctxReader{ctx, r} }

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
