package firmware

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/url"
	"strings"
	"time"

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

// download streams the image into the installer's sink, resuming from the
// persisted checkpoint, and returns the final checkpoint (Done, hashes of the
// whole transfer and of the written image).
func (m *Manager) download(ctx context.Context) (checkpoint, error) {
	m.mu.Lock()
	rec := m.rec
	m.mu.Unlock()
	u := rec.update()
	log := m.log.With(zap.String("update_id", u.ID))

	cp, err := m.resumePoint(u)
	if err != nil || cp.Done {
		return cp, err
	}
	if cp.Offset > 0 {
		log.Info("resuming download", zap.Int64("bytes", cp.Offset), zap.Int64("total", cp.Total))
	}

	hold := ctx
	ctx, cancel := context.WithTimeout(ctx, m.cfg.DownloadTimeout)
	defer cancel()
	m.dropRetry()
	defer m.dropRetry()
	// Updates are rare: do not keep connections (and their goroutines) open
	// between them.
	defer m.cfg.HTTPClient.CloseIdleConnections()

	st, err := m.openStream(ctx, u, cp)
	if err != nil {
		return cp, err
	}
	st.hold = hold
	err = st.run(ctx, u)
	if err != nil {
		var gu *giveUpError
		if ctx.Err() != nil && errors.Is(context.Cause(ctx), context.DeadlineExceeded) && !errors.Is(err, context.Canceled) && !errors.As(err, &gu) {
			// A Fetcher's download (an HTTP one says it in giveUpError).
			err = coded(CodeDownload, fmt.Errorf("download: did not finish within %s: %w", m.cfg.DownloadTimeout, err))
		}
		return st.cp, err
	}
	m.mu.Lock()
	m.backRead = st.readBack
	m.mu.Unlock()
	m.emitBytes(st.cp.Offset, st.cp.Total)
	log.Info("download complete", zap.Int64("bytes", st.cp.Offset), zap.Int64("written", st.cp.Written))
	return st.cp, nil
}

// streamHashes says whether the stream hashes the bytes it writes. It does
// not when the installer reads them back and the request names their
// SHA-256: the read-back hashes the image as the storage holds it, which is
// then checked against the request directly, and hashing the same bytes on
// the way in as well would only cost time. Without a read-back, or without
// a SHA-256 to check the read-back against, the stream's hash is the
// reference; a compressed image is always hashed on the stream too
// (decoder), because the request's SHA-256 is over the transfer.
func (m *Manager) streamHashes(u Update) bool {
	_, readsBack := m.cfg.Installer.(ReadBacker)
	return !readsBack || u.Request.SHA256 == ""
}

// openStream sets up the streamer at cp: the signature check (fetched or
// restored), the installer's sink opened at cp.Written and the hash state
// restored from cp.
func (m *Manager) openStream(ctx context.Context, u Update, cp checkpoint) (*streamer, error) {
	verifier, err := m.startVerifier(ctx, u.Request, &cp)
	if err != nil {
		return nil, err
	}
	sink, err := m.cfg.Installer.Open(ctx, u, cp.Written)
	if err != nil {
		return nil, coded(CodeDownload, fmt.Errorf("open the image destination: %w", err))
	}
	st := &streamer{m: m, ctx: ctx, cp: cp, sink: sink, limit: u.Request.Size, lastSync: time.Now(), handed: cp.Written, mark: -1}
	if m.streamHashes(u) {
		if st.imgHash, err = restoreHash(cp.ImgHash); err != nil {
			sink.Close()
			return nil, err
		}
	}
	if verifier != nil {
		st.sig = verifier
	}
	if rb, ok := m.cfg.Installer.(ReadBacker); ok {
		img, err := rb.ReadBack(ctx, u)
		if err != nil {
			sink.Close()
			return nil, coded(CodeVerify, fmt.Errorf("read back: %w", err))
		}
		// Everything before the resume point was synced before its
		// checkpoint was recorded: read it back (again) from byte 0.
		st.back = startBackReader(ctx, img, cp.Written)
	}
	return st, nil
}

// run streams the image from its source into the sink, makes it durable,
// closes the sink (also on failure), waits for the read-back of the last
// part and then records the final checkpoint.
func (s *streamer) run(ctx context.Context, u Update) error {
	s.sy = startSyncer(s.sink, s.m.store, s.back, s.cp)
	var err error
	if isHTTP(u.Request.URI) {
		done := false
		if u.Request.IndexURI != "" && s.cp.Fallback == "" {
			done, err = s.adaptive(ctx, u)
		}
		if err == nil && !done {
			from := s.cp.Offset
			err = s.fromHTTP(ctx, u)
			if u.Request.IndexURI != "" {
				s.cp.Fetched += s.cp.Offset - from
				s.setAdaptive()
			}
		}
	} else {
		err = s.fromFetcher(ctx, u)
	}
	if err == nil {
		err = s.finish()
	}
	// The syncer must be done with the sink before it is closed, also when
	// the stream failed: a checkpoint it is still making is a valid one.
	if serr := s.sy.stop(); err == nil && serr != nil {
		err = serr
	}
	if cerr := s.sink.Close(); err == nil && cerr != nil {
		err = coded(CodeDownload, fmt.Errorf("close the image destination: %w", cerr))
	}
	if s.back != nil {
		if err == nil {
			s.readBack, err = s.back.finish(u.ID, s.cp.Written)
		}
		if serr := s.back.stop(); err == nil {
			err = serr
		}
	}
	if err == nil {
		err = s.saveFinal()
	}
	return err
}

// streamer moves bytes from a source to the sink, hashing, counting and
// reporting progress; it hands checkpoints to a syncer, which makes them
// durable on its own goroutine. The streamer itself is used by one
// goroutine.
type streamer struct {
	m        *Manager
	ctx      context.Context // the download's, bounded by DownloadTimeout
	hold     context.Context // the Manager's: bounds a wait for the final checkpoint to be saved
	cp       checkpoint
	final    checkpoint // the final checkpoint (finish), written by saveFinal
	sink     Sink
	sy       *syncer
	back     *backReader // reads back what the syncer made durable; nil if the installer cannot
	readBack readBackResult
	limit    int64     // declared transfer size, 0 if none
	imgHash  hash.Hash // over written bytes; nil when the read-back hashes them instead (streamHashes)
	rawHash  hash.Hash // over transferred bytes, compressed only (else they are the written bytes)
	sig      sigWriter // signature check over transferred bytes, nil without one
	raw      func() int64
	lastSync time.Time
	handed   int64 // Written of the last checkpoint handed to the syncer
	mark     int64 // progressMark of the last progress reported, -1 before any
}

// write forwards decoded bytes to the sink and hands a checkpoint to the
// syncer when one is due.
func (s *streamer) write(p []byte) error {
	if s.imgHash != nil {
		s.imgHash.Write(p)
	}
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
	if s.cp.Written-s.handed >= s.m.cfg.CheckpointBytes || now.Sub(s.lastSync) >= 5*time.Second {
		if err := s.handOff(); err != nil {
			return err
		}
		s.lastSync = now
	}
	if mark := progressMark(s.rawOffset(), s.cp.Total); mark != s.mark {
		s.mark = mark
		s.m.emitBytes(s.rawOffset(), s.cp.Total)
	}
	return nil
}

// progressMark is the granularity of download progress (see
// Config.Observer): the whole percentage of the transfer, or the MiB when
// its size is unknown. Progress is reported when it changes.
func progressMark(done, total int64) int64 {
	if total > 0 {
		return done * 100 / total
	}
	return done >> 20
}

func (s *streamer) rawOffset() int64 {
	if s.raw != nil {
		return s.raw()
	}
	return s.cp.Offset
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
		ctx: ctx, m: s.m, lastByte: time.Now(), url: u.Request.URI, offset: s.cp.Offset, total: s.cp.Total,
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

	var src io.Reader = rr
	var tee io.Reader // compressed only: the transfer, hashed as it is consumed
	if s.cp.Offset == 0 {
		s.cp.Compressed = false
		// Only a fresh download can be compressed (compressed checkpoints are
		// never resumed).
		dec, t, err := s.decoder(u, rr)
		if err != nil {
			return err
		}
		defer dec.Close()
		src, tee = dec, t
	}
	if err := s.copyFrom(src, rr); err != nil {
		return err
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

// decoder looks at the start of a fresh transfer and returns what to read
// the image from: the transfer itself, or a gzip or zstd decoder over it.
// For a compressed image it also returns the tee that hashes (and checks
// the signature of) the transferred bytes as the decoder consumes them.
// Peeking reads ahead into a buffer; nothing is hashed until it is known
// which bytes (transferred or decoded) to hash.
func (s *streamer) decoder(u Update, rr *rangeReader) (io.ReadCloser, io.Reader, error) {
	br := bufio.NewReaderSize(rr, 64<<10)
	magic, _ := br.Peek(4)
	kind := compression(u.Request.URI, rr.contentType, magic)
	if kind == "" {
		return io.NopCloser(br), nil, nil
	}
	s.rawHash = newHash()
	if s.imgHash == nil {
		// The request's SHA-256 is over the transfer, not over what is
		// stored: the decoded bytes need a hash of their own.
		s.imgHash = newHash()
	}
	var w io.Writer = s.rawHash
	if s.sig != nil {
		w = io.MultiWriter(s.rawHash, s.sig)
	}
	tee := io.TeeReader(br, w)
	var dec io.ReadCloser
	switch kind {
	case "gzip":
		zr, err := gzip.NewReader(tee)
		if err != nil {
			return nil, nil, rr.errOr(coded(CodeVerify, fmt.Errorf("gzip image: %w", err)))
		}
		dec = zr
	case "zstd":
		zr, err := zstd.NewReader(tee, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(zstdMaxWindow))
		if err != nil {
			return nil, nil, coded(CodeVerify, fmt.Errorf("zstd image: %w", err))
		}
		dec = zr.IOReadCloser()
	}
	s.cp.Compressed = true
	s.raw = func() int64 { return rr.offset }
	s.m.log.Info("decompressing image while downloading", zap.String("update_id", u.ID), zap.String("format", kind))
	return dec, tee, nil
}

// copyFrom writes everything src delivers through the one stream buffer.
func (s *streamer) copyFrom(src io.Reader, rr *rangeReader) error {
	buf := make([]byte, copyBufSize)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if werr := s.write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
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
