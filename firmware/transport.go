package firmware

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"
)

var (
	errStalled   = errors.New("no data received within the idle timeout")
	errTruncated = errors.New("the connection closed before the whole image arrived")
	errNoRanges  = errors.New("the server answered a Range request with the whole image (200, not 206)")
)

// rangeReader reads one HTTP resource from offset on, reconnecting with a
// Range request (and backoff) when a transfer breaks, stalls or is cut short.
// A permanent failure is kept in err and returned from every later Read.
type rangeReader struct {
	ctx     context.Context
	m       *Manager
	url     string
	backoff *backoff.ExponentialBackOff
	limit   int64 // declared size, 0 if none
	offset  int64 // bytes received so far
	// end, when > 0, ends the transfer there (exclusive): a bounded Range
	// request "bytes=offset-(end-1)", complete at end (adaptive.go).
	end int64
	// rangeOnly refuses a 200 answer (errNoRanges) instead of skipping
	// the bytes before offset: an adaptive install falls back then.
	rangeOnly    bool
	total        int64 // full size, 0 if unknown
	etag         string
	lastModified string
	contentType  string

	body   io.ReadCloser
	reqCtx context.Context         // of the current request
	cancel context.CancelCauseFunc // of the current request
	idle   *time.Timer             // cancels the request when no byte arrives
	err    error

	// The attempts of the current round of retries, for the error that
	// ends the download (giveUp): how many, since when, and the last
	// failure.
	tries int
	since time.Time
	last  error

	// The stall clock (Config.StallTimeout): when the last new byte
	// arrived (or the download began), how many attempts failed since,
	// whether the last failure was permanent, whether the stall clock
	// bounds the current round, and the idle timeout of the current
	// request.
	lastByte   time.Time
	failures   int
	lastPerm   bool
	stallBound bool
	idleFor    time.Duration
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
	var cause error // why the transfer broke, for a download that stalled out
	if r.body != nil {
		n, err := r.readBody(p)
		if r.err != nil {
			r.err = r.giveUp(r.err)
			return 0, r.err
		}
		if n > 0 || err == nil {
			return n, nil
		}
		if err == io.EOF {
			return 0, io.EOF
		}
		r.m.log.Info("transfer interrupted; resuming", zap.Error(err), zap.Int64("bytes", r.offset))
		cause = err
	}
	n, err := r.recover(p, cause)
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
		r.idleFor = min(r.m.cfg.IdleTimeout, r.m.cfg.StallTimeout)
		r.idle.Reset(r.idleFor)
		r.lastByte = time.Now()
		if r.failures > 0 {
			r.failures = 0
			r.m.clearRetry()
		}
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
				fmt.Errorf("the server sent more than the %d bytes it announced", r.total)))
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
	if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		if err == io.EOF && r.end > 0 && r.offset == r.end || err == io.EOF && r.end == 0 && (r.total == 0 || r.offset == r.total) {
			return 0, io.EOF
		}
		return 0, fmt.Errorf("%w: received %s", errTruncated, r.received())
	}
	if errors.Is(cause, errStalled) {
		return 0, fmt.Errorf("%w (%s) after %s", errStalled, r.idleFor, r.received())
	}
	return 0, fmt.Errorf("read: %w after %s", err, r.received())
}

// received says how much of the image arrived, and of how much when that
// is known (from the server, else from the request's size): "1048576 of
// 4194304 bytes", "1048576 bytes, size unknown".
func (r *rangeReader) received() string {
	switch {
	case r.total > 0:
		return fmt.Sprintf("%d of %d bytes", r.offset, r.total)
	case r.limit > 0:
		return fmt.Sprintf("%d of %d bytes", r.offset, r.limit)
	}
	return fmt.Sprintf("%d bytes, size unknown", r.offset)
}

// roundBudget starts a round of attempts and returns how long it may
// retry: RetryMaxElapsed, or less when StallTimeout since the last new
// byte runs out first. ok is false when it has already run out.
func (r *rangeReader) roundBudget() (time.Duration, bool) {
	r.startTries()
	left := time.Until(r.lastByte.Add(r.m.cfg.StallTimeout))
	r.stallBound = left < r.m.cfg.RetryMaxElapsed
	return min(left, r.m.cfg.RetryMaxElapsed), left > 0
}

// stalledOut is the error of a round that could not start because
// StallTimeout ran out: the failure that ended the last transfer.
func (r *rangeReader) stalledOut(cause error) error {
	if cause == nil {
		cause = errStalled
	}
	r.last, r.lastPerm = cause, false
	return coded(CodeDownload, r.giveUp(cause))
}

// recover reconnects with backoff and reads at least one byte. Progress
// since the last failure resets the backoff (Retry resets it on entry).
func (r *rangeReader) recover(p []byte, cause error) (int, error) {
	budget, ok := r.roundBudget()
	if !ok {
		return 0, r.stalledOut(cause)
	}
	n, err := backoff.Retry(r.ctx, func() (int, error) {
		r.tries++
		if r.body == nil {
			if err := r.connect(); err != nil {
				return 0, r.failed(err)
			}
		}
		n, err := r.readBody(p)
		if n > 0 || err == io.EOF {
			return n, backoff.Permanent(err) // Permanent(nil) is nil
		}
		if r.err != nil {
			return 0, r.failed(r.err)
		}
		return 0, r.failed(err)
	}, backoff.WithBackOff(r.backoff), backoff.WithMaxElapsedTime(budget), backoff.WithNotify(r.notify))
	if err == io.EOF {
		return n, io.EOF
	}
	if err != nil {
		return n, coded(CodeDownload, r.giveUp(err))
	}
	return n, nil
}

// reconnect connects with backoff without reading.
func (r *rangeReader) reconnect() error {
	budget, _ := r.roundBudget() // the first round: the download just began
	_, err := backoff.Retry(r.ctx, func() (struct{}, error) {
		r.tries++
		return struct{}{}, r.failed(r.connect())
	}, backoff.WithBackOff(r.backoff), backoff.WithMaxElapsedTime(budget), backoff.WithNotify(r.notify))
	if err != nil {
		err = coded(CodeDownload, r.giveUp(err))
		r.err = err
	}
	return err
}

// startTries begins a round of attempts.
func (r *rangeReader) startTries() {
	r.tries, r.since, r.last = 0, time.Now(), nil
}

// failed notes err as the last failure of this round, unless it is only
// the download's context ending, and returns it.
func (r *rangeReader) failed(err error) error {
	if err != nil && r.ctx.Err() == nil {
		var pe *backoff.PermanentError
		r.last, r.lastPerm = err, errors.As(err, &pe)
	}
	return err
}

// notify logs a failed attempt and reports the retry (Progress.Retry).
func (r *rangeReader) notify(err error, wait time.Duration) {
	r.failures++
	url := redactURI(r.url)
	r.m.log.Warn("download attempt failed; retrying", zap.String("url", url), zap.Error(err),
		zap.Int("attempt", r.failures), zap.Duration("wait", wait), zap.Int64("bytes", r.offset))
	r.m.setRetry(Retry{Attempt: r.failures, LastError: "download from " + url + ": " + err.Error(), NextAttemptAt: time.Now().Add(wait).UTC()})
}

// giveUp is the error that ends an HTTP download: it names the URL, what
// failed last and how long it was tried (giveUpError). A stop of the
// Manager (cancelled context) is returned as it is.
func (r *rangeReader) giveUp(err error) error {
	var gu *giveUpError
	if err == nil || err == io.EOF || errors.As(err, &gu) || errors.Is(r.ctx.Err(), context.Canceled) {
		return err
	}
	e := &giveUpError{what: "download", url: redactURI(r.url), cause: err, tries: r.tries, over: time.Since(r.since)}
	switch {
	case errors.Is(err, context.DeadlineExceeded) && r.ctx.Err() != nil:
		// update.downloadTimeout ran out: what is known is how far it got,
		// and what failed last, if anything did.
		e.cause, e.timeout, e.received = r.last, r.m.cfg.DownloadTimeout, r.received()
	case r.stallBound && !r.lastPerm:
		// update.stallTimeout ran out before the next attempt.
		e.stall, e.idle, e.received = r.m.cfg.StallTimeout, time.Since(r.lastByte), r.received()
	}
	return e
}

// giveUpError is why a download stopped: where from, the last failure, and
// how often and how long it was tried. Its message reads
// "download from https://host:port/path: connect: connection refused (12
// attempts over 10m0s)".
type giveUpError struct {
	what     string // "download", "signature download"
	url      string // without query or user info
	cause    error  // the last failure; nil when the timeout ran out without one
	tries    int
	over     time.Duration
	timeout  time.Duration // the download's budget, when it ran out
	stall    time.Duration // the stall timeout, when it ran out
	idle     time.Duration // how long no new byte had arrived then
	received string        // how much had arrived then
}

func (e *giveUpError) Error() string {
	var b strings.Builder
	b.WriteString(e.what + " from " + e.url + ": ")
	if e.timeout > 0 {
		fmt.Fprintf(&b, "did not finish within %s (received %s)", e.timeout, e.received)
		if e.cause != nil {
			b.WriteString("; last failure: ")
		}
	} else if e.stall > 0 {
		// The retries stop when the next attempt would start past the
		// stall timeout, so what passed may be a little less than it.
		fmt.Fprintf(&b, "no new byte for %s (update.stallTimeout %s; received %s); last failure: ", roundDuration(e.idle), e.stall, e.received)
	}
	if e.cause != nil {
		b.WriteString(e.cause.Error())
	}
	if e.tries > 1 {
		fmt.Fprintf(&b, " (%d attempts over %s)", e.tries, roundDuration(e.over))
	}
	return b.String()
}

func (e *giveUpError) Unwrap() error { return e.cause }

// roundDuration keeps a duration readable: "10m3s", "4.2s", "350ms".
func roundDuration(d time.Duration) time.Duration {
	switch {
	case d >= time.Minute:
		return d.Round(time.Second)
	case d >= time.Second:
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Millisecond)
}

// connect issues a GET from offset and classifies the answer. Permanent
// failures are wrapped with backoff.Permanent.
func (r *rangeReader) connect() error {
	ctx, cancel := context.WithCancelCause(r.ctx)
	req, err := r.newRequest(ctx)
	if err != nil {
		cancel(nil)
		return err
	}
	// The idle timer covers the wait for headers too; it never runs past
	// the stall clock.
	r.idleFor = max(min(r.m.cfg.IdleTimeout, time.Until(r.lastByte.Add(r.m.cfg.StallTimeout))), time.Millisecond)
	idle := time.AfterFunc(r.idleFor, func() { cancel(errStalled) })
	resp, err := r.m.cfg.HTTPClient.Do(req)
	if err != nil {
		idle.Stop()
		cause := context.Cause(ctx)
		cancel(nil)
		return r.requestError(err, cause)
	}
	if err := r.accept(resp); err != nil {
		idle.Stop()
		resp.Body.Close()
		cancel(nil)
		return err
	}
	if resp.StatusCode == http.StatusRequestedRangeNotSatisfiable {
		// Everything was already stored before the restart.
		idle.Stop()
		resp.Body.Close()
		cancel(nil)
		r.body = io.NopCloser(strings.NewReader(""))
		r.idle = time.NewTimer(time.Hour)
		r.idle.Stop()
		return nil
	}
	r.body, r.cancel, r.idle, r.reqCtx = resp.Body, cancel, idle, ctx
	return nil
}

// newRequest is the GET of the image from offset: a Range request with
// If-Range after the first byte, so a changed image is not continued.
func (r *rangeReader) newRequest(ctx context.Context) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return nil, backoff.Permanent(fmt.Errorf("bad URL: %w", err))
	}
	// identity: a transparently decoded body would break byte offsets.
	req.Header.Set("Accept-Encoding", "identity")
	req.Header.Set("User-Agent", "gwagent")
	if r.end > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(r.offset, 10)+"-"+strconv.FormatInt(r.end-1, 10))
	} else if r.offset > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(r.offset, 10)+"-")
	}
	if r.offset > 0 || r.end > 0 {
		if r.etag != "" && !strings.HasPrefix(r.etag, "W/") {
			req.Header.Set("If-Range", r.etag)
		} else if r.lastModified != "" {
			req.Header.Set("If-Range", r.lastModified)
		}
	}
	return req, nil
}

// requestError classifies a request that got no response; cause is why
// its context ended, if it did. The error says what failed, not where:
// giveUp adds the URL.
func (r *rangeReader) requestError(err, cause error) error {
	if r.ctx.Err() != nil {
		return backoff.Permanent(r.ctx.Err())
	}
	if errors.Is(cause, errStalled) {
		if r.idleFor < r.m.cfg.IdleTimeout && r.last != nil {
			// What was left of update.stallTimeout, not the server, cut
			// this attempt short: the failure before it says more.
			return r.last
		}
		return fmt.Errorf("no response within %s", roundDuration(r.idleFor))
	}
	if permanentNetError(err) {
		return backoff.Permanent(netCause(err))
	}
	return netCause(err)
}

// netCause says briefly what the network did to a request: "connect:
// connection refused", "resolve fw.example.com: no such host", the TLS
// error as it is. It still unwraps to the error it describes.
func netCause(err error) error {
	err = unwrapURLError(err)
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return &causeError{msg: fmt.Sprintf("resolve %s: %s", dnsErr.Name, dnsErr.Err), err: err}
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" && opErr.Err != nil {
		return &causeError{msg: opErr.Err.Error(), err: err}
	}
	return err
}

// causeError is an error with a shorter message than the one it wraps.
type causeError struct {
	msg string
	err error
}

func (e *causeError) Error() string { return e.msg }
func (e *causeError) Unwrap() error { return e.err }

// accept checks a response against what is known of the resource and takes
// its size and validators. A nil error means the body can be read from
// offset on (or, for 416 at the end, that nothing is left to read); the
// caller closes the body on error.
func (r *rangeReader) accept(resp *http.Response) error {
	status := "HTTP " + resp.Status
	switch {
	case resp.StatusCode == http.StatusOK && r.rangeOnly:
		return backoff.Permanent(errNoRanges)
	case resp.StatusCode == http.StatusOK:
		if err := r.acceptFull(resp); err != nil {
			return err
		}
	case resp.StatusCode == http.StatusPartialContent:
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != r.offset {
			return backoff.Permanent(fmt.Errorf("%s: unexpected Content-Range %q for offset %d", status, resp.Header.Get("Content-Range"), r.offset))
		}
		if total > 0 {
			if r.total > 0 && total != r.total {
				return backoff.Permanent(fmt.Errorf("the image changed on the server during the download (%d bytes, was %d)", total, r.total))
			}
			r.total = total
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && r.end > 0:
		return backoff.Permanent(coded(CodeVerify, fmt.Errorf("%s: the server's image ends before byte %d", status, r.end-1)))
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && r.total > 0 && r.offset == r.total:
		return nil
	case resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests,
		resp.StatusCode >= 500:
		e := errors.New(status)
		if d, ok := retryAfter(resp.Header.Get("Retry-After"), r.m.cfg.RetryMaxElapsed); ok {
			return &retryAfterError{err: e, ra: &backoff.RetryAfterError{Duration: d}}
		}
		return e
	default:
		return backoff.Permanent(errors.New(status))
	}
	if r.limit > 0 && r.total > 0 && r.total != r.limit {
		return backoff.Permanent(coded(CodeVerify,
			fmt.Errorf("size mismatch: the request declares %d bytes, the server has %d", r.limit, r.total)))
	}
	if v := resp.Header.Get("ETag"); v != "" {
		r.etag = v
	}
	if v := resp.Header.Get("Last-Modified"); v != "" {
		r.lastModified = v
	}
	r.contentType = resp.Header.Get("Content-Type")
	return nil
}

// acceptFull takes a 200 answer: the whole resource. After the first byte
// (the server ignored the Range) the stored part is skipped.
func (r *rangeReader) acceptFull(resp *http.Response) error {
	if r.offset > 0 {
		if v := resp.Header.Get("ETag"); r.etag != "" && v != "" && v != r.etag {
			return backoff.Permanent(fmt.Errorf("the image changed on the server during the download (ETag %s, was %s)", v, r.etag))
		}
		if _, err := io.CopyN(io.Discard, resp.Body, r.offset); err != nil {
			return fmt.Errorf("skip %d stored bytes: %w", r.offset, err)
		}
	}
	if resp.ContentLength >= 0 {
		if r.total > 0 && resp.ContentLength != r.total {
			return backoff.Permanent(fmt.Errorf("the image changed on the server during the download (%d bytes, was %d)", resp.ContentLength, r.total))
		}
		r.total = resp.ContentLength
	}
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
// certificates, talking TLS to a plain port, unsupported schemes, refused
// redirects.
func permanentNetError(err error) bool {
	var (
		rdir *RedirectError
		verr *tls.CertificateVerificationError
		uerr x509.UnknownAuthorityError
		herr x509.HostnameError
		cerr x509.CertificateInvalidError
		rerr tls.RecordHeaderError
	)
	if errors.As(err, &rdir) || errors.As(err, &verr) || errors.As(err, &uerr) || errors.As(err, &herr) ||
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
