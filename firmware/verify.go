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

// stepVerifying checks the finished download against the request and, when the
// backend can read back, the stored image against what was written.
func (m *Manager) stepVerifying(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	rec := m.rec
	m.mu.Unlock()
	var cp checkpoint
	ok, err := m.store.readJSON(checkpointFile, &cp)
	if err != nil {
		return "", err
	}
	if !ok || !cp.Done || cp.UpdateID != rec.UpdateID {
		// The download record is gone (e.g. lost with a power cut before the
		// directory fsync): download again rather than trust the slot.
		m.log.Warn("download checkpoint missing; downloading again", zap.String("update_id", rec.UpdateID))
		return PhaseDownloading, nil
	}
	req := rec.Request
	if req.Size > 0 && cp.Offset != req.Size {
		return "", coded(CodeVerify, fmt.Errorf("size mismatch: want %d bytes, got %d", req.Size, cp.Offset))
	}
	raw, err := restoreHash(cp.RawHash)
	if err != nil {
		return "", err
	}
	if got := hex.EncodeToString(raw.Sum(nil)); req.SHA256 != "" && got != req.SHA256 {
		return "", coded(CodeVerify, fmt.Errorf("sha256 mismatch: want %s, got %s", req.SHA256, got))
	}
	if err := m.checkSignature(rec, cp); err != nil {
		return "", err
	}
	img, err := restoreHash(cp.ImgHash)
	if err != nil {
		return "", err
	}
	imgSum := hex.EncodeToString(img.Sum(nil))
	u := rec.update()
	u.ImageSize, u.ImageSHA256 = cp.Written, imgSum
	rb, readsBack := m.cfg.Installer.(ReadBacker)
	if readsBack {
		if err := readBack(ctx, rb, u); err != nil {
			return "", err
		}
	}
	if err := m.persist(func(r *record) {
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
		zap.String("sha256", imgSum))
	return PhaseApplying, nil
}

func readBack(ctx context.Context, rb ReadBacker, u Update) error {
	rc, err := rb.ReadBack(ctx, u)
	if err != nil {
		return coded(CodeVerify, fmt.Errorf("read back: %w", err))
	}
	defer rc.Close()
	h, n, err := hashReadAhead(ctx, rc, u.ImageSize)
	if err != nil {
		return coded(CodeVerify, fmt.Errorf("read back: %w", err))
	}
	if n != u.ImageSize {
		return coded(CodeVerify, fmt.Errorf("read back: stored image has %d bytes, wrote %d", n, u.ImageSize))
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != u.ImageSHA256 {
		return coded(CodeVerify, fmt.Errorf("read back: sha256 mismatch: wrote %s, stored %s", u.ImageSHA256, got))
	}
	return nil
}

// readAheadBufs is how many copyBufSize buffers a read-back keeps in
// flight: enough for the storage to deliver the next ones while one is
// hashed, few enough that memory use stays small and fixed.
const readAheadBufs = 4

// hashReadAhead returns the SHA-256 of the first n bytes of r and how many
// there were (fewer when r ends early). A second goroutine reads while this
// one hashes, so reading the storage and hashing overlap instead of taking
// turns; it has returned when hashReadAhead returns.
func hashReadAhead(ctx context.Context, r io.Reader, n int64) (hash.Hash, int64, error) {
	type chunk struct {
		b   []byte
		err error // io.EOF after the last bytes
	}
	// Every chunk holds one of the readAheadBufs buffers, so neither channel
	// can be full when the reader or the hasher sends.
	full := make(chan chunk, readAheadBufs)
	free := make(chan []byte, readAheadBufs)
	for range readAheadBufs {
		free <- make([]byte, copyBufSize)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		lr := io.LimitReader(ContextReader(ctx, r), n)
		for {
			var b []byte
			select {
			case b = <-free:
			case <-stop:
				return
			}
			k, err := io.ReadFull(lr, b)
			if err == io.ErrUnexpectedEOF {
				err = io.EOF
			}
			full <- chunk{b[:k], err}
			if err != nil {
				return
			}
		}
	})
	defer func() {
		close(stop)
		wg.Wait()
	}()
	h := newHash()
	var total int64
	for {
		var c chunk
		select {
		case c = <-full:
		case <-ctx.Done():
			return nil, total, ctx.Err()
		}
		h.Write(c.b)
		total += int64(len(c.b))
		if c.err == io.EOF {
			return h, total, nil
		}
		if c.err != nil {
			return nil, total, c.err
		}
		free <- c.b[:cap(c.b)]
	}
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
