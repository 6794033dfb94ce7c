package firmware

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/klauspost/compress/zstd"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
)

// copyBufSize is the one buffer a download streams through; memory use does
// not depend on the image size.
const copyBufSize = 256 << 10

// zstdMaxWindow bounds the decoder's window (and so its memory). Images made
// with `zstd --long=27` or less fit.
const zstdMaxWindow = 128 << 20

var (
	errStalled   = errors.New("no data received within the idle timeout")
	errTruncated = errors.New("connection closed before the whole image arrived")
)

// download streams the image into the installer's sink, resuming from the
// persisted checkpoint, and returns the final checkpoint (Done, hashes of the
// whole transfer and of the written image).
func (m *Manager) download(ctx context.Context) (checkpoint, error) {
	m.mu.Lock()
	rec := m.rec
	m.mu.Unlock()
	u := rec.update()
	log := m.log.With(zap.String("update_id", u.ID))

	var cp checkpoint
	ok, err := m.store.readJSON(checkpointFile, &cp)
	if err != nil {
		return cp, err
	}
	valid := ok && cp.Format == stateFormat && cp.UpdateID == u.ID && cp.URI == u.Request.URI
	if valid && cp.Done {
		return cp, nil
	}
	// A checkpoint without a signature state (written before a policy was
	// configured) cannot be continued into a verifiable signature.
	sigGap := m.cfg.Signatures != nil && u.Request.SignatureURI != "" && cp.Offset > 0 && len(cp.SigState) == 0
	if !valid || cp.Compressed || !isHTTP(u.Request.URI) || sigGap {
		cp = checkpoint{Format: stateFormat, UpdateID: u.ID, URI: u.Request.URI}
	}
	if cp.Offset > 0 {
		log.Info("resuming download", zap.Int64("bytes", cp.Offset), zap.Int64("total", cp.Total))
	}

	ctx, cancel := context.WithTimeout(ctx, m.cfg.DownloadTimeout)
	defer cancel()
	// Updates are rare: do not keep connections (and their goroutines) open
	// between them.
	defer m.cfg.HTTPClient.CloseIdleConnections()

	verifier, err := m.startVerifier(ctx, u.Request, &cp)
	if err != nil {
		return cp, err
	}
	sink, err := m.cfg.Installer.Open(ctx, u, cp.Written)
	if err != nil {
		return cp, coded(CodeDownload, fmt.Errorf("open the image destination: %w", err))
	}
	st := &streamer{m: m, ctx: ctx, cp: cp, sink: sink, limit: u.Request.Size, lastSync: time.Now(), handed: cp.Written}
	if st.imgHash, err = restoreHash(cp.ImgHash); err != nil {
		sink.Close()
		return cp, err
	}
	if verifier != nil {
		st.sig = verifier
	}
	st.sy = startSyncer(sink, m.store)
	if isHTTP(u.Request.URI) {
		err = st.fromHTTP(ctx, u)
	} else {
		err = st.fromFetcher(ctx, u)
	}
	if err == nil {
		err = st.finish()
	}
	// The syncer must be done with the sink before it is closed, also when
	// the stream failed: a checkpoint it is still making is a valid one.
	if serr := st.sy.stop(); err == nil && serr != nil {
		err = serr
	}
	if cerr := sink.Close(); err == nil && cerr != nil {
		err = coded(CodeDownload, fmt.Errorf("close the image destination: %w", cerr))
	}
	if err != nil {
		if ctx.Err() != nil && errors.Is(context.Cause(ctx), context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
			err = coded(CodeDownload, fmt.Errorf("download: did not finish within %s: %w", m.cfg.DownloadTimeout, err))
		}
		return st.cp, err
	}
	m.emitBytes(st.cp.Offset, st.cp.Total)
	log.Info("download complete", zap.Int64("bytes", st.cp.Offset), zap.Int64("written", st.cp.Written))
	return st.cp, nil
}

// streamer moves bytes from a source to the sink, hashing, counting and
// reporting progress; it hands checkpoints to a syncer, which makes them
// durable on its own goroutine. The streamer itself is used by one
// goroutine.
type streamer struct {
	m        *Manager
	ctx      context.Context
	cp       checkpoint
	sink     Sink
	sy       *syncer
	limit    int64     // declared transfer size, 0 if none
	imgHash  hash.Hash // over written bytes
	rawHash  hash.Hash // over transferred bytes; == imgHash when not compressed
	sig      sigWriter // signature check over transferred bytes, nil without one
	raw      func() int64
	lastSync time.Time
	handed   int64 // Written of the last checkpoint handed to the syncer
	lastEmit time.Time
}

// write forwards decoded bytes to the sink and hands a checkpoint to the
// syncer when one is due.
func (s *streamer) write(p []byte) error {
	s.imgHash.Write(p)
	if s.sig != nil && !s.cp.Compressed {
		s.sig.Write(p)
	}
	if _, err := s.sink.Write(p); err != nil {
		return coded(CodeDownload, fmt.Errorf("write image: %w", err))
	}
	s.cp.Written += int64(len(p))
	if !s.cp.Compressed {
		s.cp.Offset = s.cp.Written
	}
	now := time.Now()
	if !s.cp.Compressed && (s.cp.Written-s.handed >= s.m.cfg.CheckpointBytes || now.Sub(s.lastSync) >= 5*time.Second) {
		if err := s.handOff(); err != nil {
			return err
		}
		s.lastSync = now
	}
	if now.Sub(s.lastEmit) >= s.m.cfg.ProgressInterval {
		s.lastEmit = now
		s.m.emitBytes(s.rawOffset(), s.cp.Total)
	}
	return nil
}

func (s *streamer) rawOffset() int64 {
	if s.raw != nil {
		return s.raw()
	}
	return s.cp.Offset
}

// snapshot saves the hash and signature states over exactly the bytes
// written so far into the checkpoint and returns a copy of it. The copy
// shares no mutable memory with the streamer (MarshalBinary returns new
// slices), so the syncer may persist it while the stream goes on.
func (s *streamer) snapshot(done bool) (checkpoint, error) {
	var err error
	if s.cp.ImgHash, err = marshalHash(s.imgHash); err != nil {
		return checkpoint{}, err
	}
	if s.rawHash != nil && s.cp.Compressed {
		if s.cp.RawHash, err = marshalHash(s.rawHash); err != nil {
			return checkpoint{}, err
		}
	} else {
		s.cp.RawHash = s.cp.ImgHash
	}
	if s.sig != nil {
		if s.cp.SigState, err = s.sig.MarshalBinary(); err != nil {
			return checkpoint{}, err
		}
	}
	s.cp.Done = done
	return s.cp, nil
}

// handOff gives the syncer a checkpoint at the current offset. The hand-off
// waits while the syncer is still busy with the previous one: that is the
// back-pressure which keeps the written bytes at most two checkpoint
// intervals ahead of the last durable checkpoint, so a kill costs at most
// that much downloading again.
func (s *streamer) handOff() error {
	cp, err := s.snapshot(false)
	if err != nil {
		return err
	}
	select {
	case s.sy.reqs <- cp:
		s.handed = cp.Written
		return nil
	case <-s.sy.done:
		return s.sy.failure()
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

// finish waits for the syncer, then makes the whole image durable and
// records the final checkpoint.
func (s *streamer) finish() error {
	if err := s.sy.stop(); err != nil {
		return err
	}
	if s.cp.Compressed && s.raw != nil {
		s.cp.Offset = s.raw()
	}
	if err := s.sink.Sync(); err != nil {
		return coded(CodeDownload, fmt.Errorf("sync image: %w", err))
	}
	cp, err := s.snapshot(true)
	if err != nil {
		return err
	}
	if err := s.m.store.writeJSON(checkpointFile, cp); err != nil {
		return persistError{err}
	}
	return nil
}

// syncer makes checkpoints durable off the streaming goroutine, so that the
// network, the hashing and the disk work at the same time: for each
// checkpoint it receives it calls Sink.Sync (which covers every byte written
// before the checkpoint was handed over, and maybe more) and only then
// persists the checkpoint. A checkpoint on disk therefore never names bytes
// that may not be on the storage.
type syncer struct {
	sink  Sink
	store store
	// reqs is unbuffered: a hand-off completes only when the syncer has
	// persisted the previous checkpoint and takes the next one.
	reqs    chan checkpoint
	done    chan struct{} // closed when run returns
	err     error         // why run stopped early; read after done is closed
	stopped bool          // stop was called (used by the streaming goroutine only)
}

func startSyncer(sink Sink, st store) *syncer {
	y := &syncer{sink: sink, store: st, reqs: make(chan checkpoint), done: make(chan struct{})}
	go y.run()
	return y
}

func (y *syncer) run() {
	defer close(y.done)
	for cp := range y.reqs {
		if err := y.sink.Sync(); err != nil {
			y.err = coded(CodeDownload, fmt.Errorf("sync image: %w", err))
			return
		}
		if err := y.store.writeJSON(checkpointFile, cp); err != nil {
			y.err = persistError{err}
			return
		}
	}
}

// failure is the syncer's error once done is closed before stop.
func (y *syncer) failure() error {
	if y.err != nil {
		return y.err
	}
	return coded(CodeInternal, errors.New("firmware: checkpoint syncer stopped"))
}

// stop waits until the checkpoint being made, if any, is durable and returns
// the syncer's error. It may be called more than once.
func (y *syncer) stop() error {
	if !y.stopped {
		y.stopped = true
		close(y.reqs)
	}
	<-y.done
	return y.err
}

// fromFetcher lets a Fetcher backend produce the image.
func (s *streamer) fromFetcher(ctx context.Context, u Update) error {
	f, ok := s.m.cfg.Installer.(Fetcher)
	if !ok || !f.Fetches(u.Request.URI) {
		return coded(CodeUnsupported, fmt.Errorf("download: no way to fetch %q", redactURI(u.Request.URI)))
	}
	if err := f.Fetch(ctx, u, &fetchWriter{s: s}); err != nil {
		return coded(CodeDownload, fmt.Errorf("download: %w", err))
	}
	return nil
}

type fetchWriter struct{ s *streamer }

func (w *fetchWriter) Write(p []byte) (int, error) {
	if w.s.limit > 0 && w.s.cp.Written+int64(len(p)) > w.s.limit {
		return 0, coded(CodeVerify, fmt.Errorf("image is larger than the declared size of %d bytes", w.s.limit))
	}
	if err := w.s.write(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (w *fetchWriter) SetTotal(n int64) { w.s.cp.Total = n }

// fromHTTP downloads u's URI from the checkpoint on.
func (s *streamer) fromHTTP(ctx context.Context, u Update) error {
	rr := &rangeReader{
		ctx: ctx, m: s.m, url: u.Request.URI, offset: s.cp.Offset, total: s.cp.Total,
		etag: s.cp.ETag, lastModified: s.cp.LastModified, limit: s.limit,
	}
	defer rr.close()
	rr.backoff = retry.NewBackoff(s.m.cfg.RetryInitialInterval, s.m.cfg.RetryMaxInterval)

	// Connect first: the response says how big the image is and whether it
	// is compressed.
	if err := rr.reconnect(); err != nil {
		return err
	}
	s.cp.Total, s.cp.ETag, s.cp.LastModified = rr.total, rr.etag, rr.lastModified
	if s.cp.Total == 0 && s.limit > 0 {
		// No Content-Length (chunked): the declared size gives percentages.
		s.cp.Total = s.limit
	}

	if s.cp.Offset == 0 {
		s.cp.Compressed = false
	}
	var src io.Reader = rr
	var tee io.Reader // compressed only: the transfer, hashed as it is consumed
	if s.cp.Offset == 0 {
		// Only a fresh download can be compressed (compressed checkpoints are
		// never resumed). Peeking reads ahead into br; nothing is hashed
		// until it is known which bytes (transferred or decoded) to hash.
		br := bufio.NewReaderSize(rr, 64<<10)
		magic, _ := br.Peek(4)
		src = br
		if kind := compression(u.Request.URI, rr.contentType, magic); kind != "" {
			s.rawHash = newHash()
			var w io.Writer = s.rawHash
			if s.sig != nil {
				w = io.MultiWriter(s.rawHash, s.sig)
			}
			tee = io.TeeReader(br, w)
			switch kind {
			case "gzip":
				zr, err := gzip.NewReader(tee)
				if err != nil {
					return rr.errOr(coded(CodeVerify, fmt.Errorf("gzip image: %w", err)))
				}
				defer zr.Close()
				src = zr
			case "zstd":
				zr, err := zstd.NewReader(tee, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
					zstd.WithDecoderMaxWindow(zstdMaxWindow))
				if err != nil {
					return coded(CodeVerify, fmt.Errorf("zstd image: %w", err))
				}
				defer zr.Close()
				src = zr
			}
			s.cp.Compressed = true
			s.raw = func() int64 { return rr.offset }
			s.m.log.Info("decompressing image while downloading", zap.String("update_id", u.ID), zap.String("format", kind))
		}
	}

	buf := make([]byte, copyBufSize)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if werr := s.write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			if rr.err != nil {
				return rr.err // the transfer's own, already explained
			}
			if s.cp.Compressed {
				return coded(CodeVerify, fmt.Errorf("decompress image: %w", err))
			}
			return coded(CodeDownload, fmt.Errorf("download: %w", err))
		}
	}
	if tee != nil {
		// Consume anything after the compressed stream so the transfer hash
		// covers the whole file.
		if _, err := io.Copy(io.Discard, tee); err != nil {
			return rr.errOr(err)
		}
	}
	return nil
}

func newHash() hash.Hash {
	h, _ := restoreHash(nil)
	return h
}

// compression decides from the URI's path suffix, then the Content-Type,
// then the magic bytes whether (and how) the image is compressed.
func compression(uri, contentType string, magic []byte) string {
	p := uri
	if pu, err := url.Parse(uri); err == nil {
		p = pu.Path
	}
	p = strings.ToLower(p)
	switch {
	case strings.HasSuffix(p, ".gz"), strings.HasSuffix(p, ".gzip"):
		return "gzip"
	case strings.HasSuffix(p, ".zst"), strings.HasSuffix(p, ".zstd"):
		return "zstd"
	}
	switch strings.ToLower(strings.TrimSpace(strings.Split(contentType, ";")[0])) {
	case "application/gzip", "application/x-gzip":
		return "gzip"
	case "application/zstd":
		return "zstd"
	}
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		return "gzip"
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return "zstd"
	}
	return ""
}

// rangeReader reads one HTTP resource from offset on, reconnecting with a
// Range request (and backoff) when a transfer breaks, stalls or is cut short.
// A permanent failure is kept in err and returned from every later Read.
type rangeReader struct {
	ctx          context.Context
	m            *Manager
	url          string
	backoff      *backoff.ExponentialBackOff
	limit        int64 // declared size, 0 if none
	offset       int64 // bytes received so far
	total        int64 // full size, 0 if unknown
	etag         string
	lastModified string
	contentType  string

	body   io.ReadCloser
	reqCtx context.Context         // of the current request
	cancel context.CancelCauseFunc // of the current request
	idle   *time.Timer             // cancels the request when no byte arrives
	err    error
}

func (r *rangeReader) errOr(err error) error {
	if r.err != nil {
		return r.err
	}
	return err
}

func (r *rangeReader) close() {
	if r.idle != nil {
		r.idle.Stop()
		r.idle = nil
	}
	if r.body != nil {
		r.body.Close()
		r.body = nil
	}
	if r.cancel != nil {
		r.cancel(nil)
		r.cancel = nil
	}
	r.reqCtx = nil
}

// Read is the fast path (one body Read, no allocation); a failure goes to
// recover, which reconnects through backoff.Retry.
func (r *rangeReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.body != nil {
		n, err := r.readBody(p)
		if r.err != nil {
			return 0, r.err
		}
		if n > 0 || err == nil {
			return n, nil
		}
		if err == io.EOF {
			return 0, io.EOF
		}
		r.m.log.Info("transfer interrupted; resuming", zap.Error(err), zap.Int64("bytes", r.offset))
	}
	n, err := r.recover(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

// readBody reads once from the current body and classifies the result:
// io.EOF only when the resource is complete; other errors are transient.
func (r *rangeReader) readBody(p []byte) (int, error) {
	n, err := r.body.Read(p)
	if n > 0 {
		r.idle.Reset(r.m.cfg.IdleTimeout)
		if r.limit > 0 && r.offset+int64(n) > r.limit {
			r.close()
			r.err = backoff.Permanent(coded(CodeVerify,
				fmt.Errorf("image is larger than the declared size of %d bytes", r.limit)))
			return 0, r.err
		}
		r.offset += int64(n)
		if r.total > 0 && r.offset > r.total {
			r.close()
			r.err = backoff.Permanent(coded(CodeDownload,
				fmt.Errorf("download: server sent more than the %d bytes it announced", r.total)))
			return 0, r.err
		}
	}
	if err == nil {
		return n, nil
	}
	if n > 0 {
		// Report the bytes now; the error shows up again on the next Read.
		return n, nil
	}
	var cause error
	if r.reqCtx != nil {
		cause = context.Cause(r.reqCtx)
	}
	r.close()
	if err == io.EOF {
		if r.total == 0 || r.offset == r.total {
			return 0, io.EOF
		}
		return 0, fmt.Errorf("download: %w at byte %d of %d", errTruncated, r.offset, r.total)
	}
	if errors.Is(cause, errStalled) {
		return 0, fmt.Errorf("download: %w (%s) at byte %d", errStalled, r.m.cfg.IdleTimeout, r.offset)
	}
	return 0, fmt.Errorf("download: %w at byte %d", err, r.offset)
}

// recover reconnects with backoff and reads at least one byte. Progress
// since the last failure resets the backoff (Retry resets it on entry).
func (r *rangeReader) recover(p []byte) (int, error) {
	n, err := backoff.Retry(r.ctx, func() (int, error) {
		if r.body == nil {
			if err := r.connect(); err != nil {
				return 0, err
			}
		}
		n, err := r.readBody(p)
		if n > 0 || err == io.EOF {
			return n, backoff.Permanent(err) // Permanent(nil) is nil
		}
		if r.err != nil {
			return 0, r.err
		}
		return 0, err
	}, backoff.WithBackOff(r.backoff), backoff.WithMaxElapsedTime(r.m.cfg.RetryMaxElapsed), backoff.WithNotify(r.notify))
	if err == io.EOF {
		return n, io.EOF
	}
	if err != nil {
		var ce *codedError
		if !errors.As(err, &ce) {
			err = coded(CodeDownload, err)
		}
		return n, err
	}
	return n, nil
}

// reconnect connects with backoff without reading.
func (r *rangeReader) reconnect() error {
	_, err := backoff.Retry(r.ctx, func() (struct{}, error) {
		return struct{}{}, r.connect()
	}, backoff.WithBackOff(r.backoff), backoff.WithMaxElapsedTime(r.m.cfg.RetryMaxElapsed), backoff.WithNotify(r.notify))
	if err != nil {
		var ce *codedError
		if !errors.As(err, &ce) {
			err = coded(CodeDownload, err)
		}
		r.err = err
	}
	return err
}

func (r *rangeReader) notify(err error, wait time.Duration) {
	r.m.log.Warn("download attempt failed; retrying", zap.Error(err),
		zap.Duration("wait", wait), zap.Int64("bytes", r.offset))
}

// connect issues a GET from offset and classifies the answer. Permanent
// failures are wrapped with backoff.Permanent.
func (r *rangeReader) connect() error {
	ctx, cancel := context.WithCancelCause(r.ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		cancel(nil)
		return backoff.Permanent(fmt.Errorf("download: bad URL %s: %w", redactURI(r.url), err))
	}
	// identity: a transparently decoded body would break byte offsets.
	req.Header.Set("Accept-Encoding", "identity")
	req.Header.Set("User-Agent", "gwagent")
	if r.offset > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(r.offset, 10)+"-")
		if r.etag != "" && !strings.HasPrefix(r.etag, "W/") {
			req.Header.Set("If-Range", r.etag)
		} else if r.lastModified != "" {
			req.Header.Set("If-Range", r.lastModified)
		}
	}
	// The idle timer covers the wait for headers too.
	idle := time.AfterFunc(r.m.cfg.IdleTimeout, func() { cancel(errStalled) })
	resp, err := r.m.cfg.HTTPClient.Do(req)
	if err != nil {
		idle.Stop()
		cause := context.Cause(ctx)
		cancel(nil)
		if r.ctx.Err() != nil {
			return backoff.Permanent(r.ctx.Err())
		}
		if errors.Is(cause, errStalled) {
			return fmt.Errorf("download: no response from %s within %s", redactURI(r.url), r.m.cfg.IdleTimeout)
		}
		if permanentNetError(err) {
			return backoff.Permanent(fmt.Errorf("download: %s: %w", redactURI(r.url), unwrapURLError(err)))
		}
		return fmt.Errorf("download: %s: %w", redactURI(r.url), unwrapURLError(err))
	}
	fail := func(e error) error {
		idle.Stop()
		resp.Body.Close()
		cancel(nil)
		return e
	}
	status := fmt.Sprintf("HTTP %s from %s", resp.Status, redactURI(r.url))
	switch {
	case resp.StatusCode == http.StatusOK:
		if r.offset > 0 {
			if v := resp.Header.Get("ETag"); r.etag != "" && v != "" && v != r.etag {
				return fail(backoff.Permanent(fmt.Errorf("download: the image changed on the server during the download (ETag %s, was %s)", v, r.etag)))
			}
			// The server ignored the Range: skip what is already stored.
			if _, err := io.CopyN(io.Discard, resp.Body, r.offset); err != nil {
				return fail(fmt.Errorf("download: skip %d stored bytes: %w", r.offset, err))
			}
		}
		if resp.ContentLength >= 0 {
			if r.total > 0 && resp.ContentLength != r.total {
				return fail(backoff.Permanent(fmt.Errorf("download: the image changed on the server during the download (%d bytes, was %d)", resp.ContentLength, r.total)))
			}
			r.total = resp.ContentLength
		}
	case resp.StatusCode == http.StatusPartialContent:
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != r.offset {
			return fail(backoff.Permanent(fmt.Errorf("download: %s: unexpected Content-Range %q for offset %d", status, resp.Header.Get("Content-Range"), r.offset)))
		}
		if total > 0 {
			if r.total > 0 && total != r.total {
				return fail(backoff.Permanent(fmt.Errorf("download: the image changed on the server during the download (%d bytes, was %d)", total, r.total)))
			}
			r.total = total
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && r.total > 0 && r.offset == r.total:
		// Everything was already stored before the restart.
		fail(nil)
		r.body = io.NopCloser(strings.NewReader(""))
		r.idle = time.NewTimer(time.Hour)
		r.idle.Stop()
		return nil
	case resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests,
		resp.StatusCode >= 500:
		e := fmt.Errorf("download: %s", status)
		if d, ok := retryAfter(resp.Header.Get("Retry-After"), r.m.cfg.RetryMaxElapsed); ok {
			return fail(&retryAfterError{err: e, ra: &backoff.RetryAfterError{Duration: d}})
		}
		return fail(e)
	default:
		return fail(backoff.Permanent(fmt.Errorf("download: %s", status)))
	}
	if r.limit > 0 && r.total > 0 && r.total != r.limit {
		return fail(backoff.Permanent(coded(CodeVerify,
			fmt.Errorf("size mismatch: the request declares %d bytes, the server has %d", r.limit, r.total))))
	}
	if v := resp.Header.Get("ETag"); v != "" {
		r.etag = v
	}
	if v := resp.Header.Get("Last-Modified"); v != "" {
		r.lastModified = v
	}
	r.contentType = resp.Header.Get("Content-Type")
	r.body, r.cancel, r.idle, r.reqCtx = resp.Body, cancel, idle, ctx
	return nil
}

// retryAfterError is a transient HTTP answer that names its own wait: it
// unwraps both to the HTTP error (for the message) and to backoff's
// RetryAfterError (for the wait).
type retryAfterError struct {
	err error
	ra  *backoff.RetryAfterError
}

func (e *retryAfterError) Error() string   { return e.err.Error() }
func (e *retryAfterError) Unwrap() []error { return []error{e.err, e.ra} }

// retryAfter parses a Retry-After header (seconds or HTTP date), capped.
func retryAfter(v string, max time.Duration) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	var d time.Duration
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0, false
		}
		d = time.Duration(s) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = time.Until(t)
		if d < 0 {
			d = 0
		}
	} else {
		return 0, false
	}
	if d > max {
		d = max
	}
	return d, true
}

func parseContentRange(v string) (start, total int64, ok bool) {
	// bytes 100-199/200 or bytes 100-199/*
	rest, found := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, size, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	a, _, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start < 0 {
		return 0, 0, false
	}
	if size != "*" {
		if total, err = strconv.ParseInt(size, 10, 64); err != nil {
			return 0, 0, false
		}
	}
	return start, total, true
}

// permanentNetError reports failures that retrying cannot fix: bad
// certificates, talking TLS to a plain port, unsupported schemes.
func permanentNetError(err error) bool {
	var (
		verr *tls.CertificateVerificationError
		uerr x509.UnknownAuthorityError
		herr x509.HostnameError
		cerr x509.CertificateInvalidError
		rerr tls.RecordHeaderError
	)
	if errors.As(err, &verr) || errors.As(err, &uerr) || errors.As(err, &herr) ||
		errors.As(err, &cerr) || errors.As(err, &rerr) {
		return true
	}
	return strings.Contains(err.Error(), "unsupported protocol scheme")
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// redactURI drops the query and user info of a URL (SAS tokens live there)
// so it can go to logs and the twin.
func redactURI(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		if i := strings.IndexAny(s, "?#"); i >= 0 {
			return s[:i]
		}
		return s
	}
	u.User = nil
	u.RawQuery = ""
	u.Fragment = ""
	return u.String()
}

// verify checks the finished download against the request and, when the
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
