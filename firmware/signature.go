package firmware

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/internal/retry"
)

// maxSignatureSize bounds the signature download.
const maxSignatureSize = signature.MaxSignatureSize

// sigWriter is what the streamer feeds with the transferred bytes when a
// signature is checked (a *signature.Verifier).
type sigWriter interface {
	io.Writer
	MarshalBinary() ([]byte, error)
}

// startVerifier prepares the signature check of a download. Resuming, it
// restores the Verifier saved in the checkpoint; otherwise it fetches the
// signature first, so an unknown key or an altered trusted comment fails
// before a single image byte is transferred (and legacy, not prehashed,
// signatures can be streamed too). It returns a nil Verifier when no
// signature is checked.
func (m *Manager) startVerifier(ctx context.Context, req Request, cp *checkpoint) (*signature.Verifier, error) {
	if m.cfg.Signatures == nil || req.SignatureURI == "" {
		return nil, nil
	}
	ring, err := m.cfg.Signatures.Keys()
	if err != nil {
		return nil, coded(CodeVerify, err)
	}
	if len(cp.SigState) > 0 && len(cp.SigText) > 0 {
		v := ring.NewVerifier()
		if err := v.UnmarshalBinary(cp.SigState); err == nil {
			return v, nil
		}
		m.log.Warn("cannot resume the signature check; downloading again")
		*cp = checkpoint{Format: stateFormat, UpdateID: cp.UpdateID, URI: cp.URI}
	}
	sig, err := m.fetchSignature(ctx, req.SignatureURI)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, coded(CodeVerify, err)
	}
	v, err := ring.NewVerifierFor(sig)
	if err != nil {
		return nil, coded(CodeVerify, err)
	}
	// The trusted comment is authenticated now: its metadata decides
	// before a byte of the image is fetched.
	if err := m.checkManifest(req, sig); err != nil {
		return nil, err
	}
	cp.SigText = sig
	return v, nil
}

// checkSignature applies the signature policy to the finished download.
func (m *Manager) checkSignature(rec record, cp checkpoint) error {
	p := m.cfg.Signatures
	if p == nil {
		if rec.Request.SignatureURI != "" {
			m.log.Warn("signature not checked: no signature policy is configured", zap.String("update_id", rec.UpdateID))
		}
		return nil
	}
	var v *signature.Verifier
	if len(cp.SigState) > 0 {
		ring, err := p.Keys()
		if err != nil {
			return coded(CodeVerify, err)
		}
		v = ring.NewVerifier()
		if err := v.UnmarshalBinary(cp.SigState); err != nil {
			return coded(CodeVerify, err)
		}
	} else if rec.Request.SignatureURI != "" {
		return coded(CodeVerify, errors.New("signature: no signature state was recorded for this download"))
	}
	info, err := p.Check(v, cp.SigText)
	if err != nil {
		return coded(CodeVerify, err)
	}
	if info.Unsigned {
		m.log.Warn("installing an unsigned image (signature.allowUnsigned)", zap.String("update_id", rec.UpdateID))
	} else {
		m.log.Info("image signature verified", zap.String("update_id", rec.UpdateID),
			zap.String("key_id", signature.FormatKeyID(info.KeyID)), zap.String("trusted_comment", info.TrustedComment))
	}
	return nil
}

// fetchSignature downloads the (small) signature file with the same retry
// rules as the image.
func (m *Manager) fetchSignature(ctx context.Context, uri string) ([]byte, error) {
	return m.fetchSmall(ctx, uri, "signature", maxSignatureSize)
}

// fetchSmall downloads a small file that belongs to the image (what names
// it: "signature", "block index") whole, with the same retry rules as the
// image and at most max bytes.
func (m *Manager) fetchSmall(ctx context.Context, uri, what string, max int64) ([]byte, error) {
	var body []byte
	err := m.fetchSmallTo(ctx, uri, what, max, func(r io.Reader) (err error) {
		body, err = io.ReadAll(r)
		return err
	})
	if err != nil {
		return nil, err
	}
	return body, nil
}

// fetchSmallTo is fetchSmall handing the body of each attempt, at most
// max+1 bytes, to read, which must start over at every call (an attempt
// that fails is retried from the start) and read r to its end.
func (m *Manager) fetchSmallTo(ctx context.Context, uri, what string, max int64, read func(io.Reader) error) error {
	b := retry.NewBackoff(m.cfg.RetryInitialInterval, m.cfg.RetryMaxInterval)
	parent := ctx
	// The whole fetch, attempts and waits, within the stall clock: not a
	// byte of it has arrived until it succeeds.
	budget := min(m.cfg.RetryMaxElapsed, m.cfg.StallTimeout)
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	defer m.cfg.HTTPClient.CloseIdleConnections()
	var (
		tries int
		last  error
		since = time.Now()
		where = redactURI(uri)
	)
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		tries++
		err := m.fetchSmallOnce(ctx, uri, what, max, read)
		if err != nil && ctx.Err() == nil {
			last = err
		}
		return struct{}{}, err
	}, backoff.WithBackOff(b), backoff.WithMaxElapsedTime(budget), backoff.WithNotify(func(err error, wait time.Duration) {
		m.log.Warn(what+" download attempt failed; retrying", zap.String("url", where), zap.Error(err),
			zap.Int("attempt", tries), zap.Duration("wait", wait))
		m.setRetry(Retry{Attempt: tries, LastError: what + " download from " + where + ": " + err.Error(), NextAttemptAt: time.Now().Add(wait).UTC()})
	}))
	if err == nil {
		m.clearRetry()
	}
	if err == nil || parent.Err() != nil {
		return err
	}
	if ctx.Err() != nil {
		err = last
		if err == nil {
			err = fmt.Errorf("no answer within %s", budget)
		}
	}
	return fmt.Errorf("%s: %w", what, &giveUpError{what: "download", url: where, cause: err, tries: tries, over: time.Since(since)})
}

// fetchSmallOnce is one attempt of fetchSmall; it marks the failures that
// retrying cannot fix (backoff.Permanent).
func (m *Manager) fetchSmallOnce(ctx context.Context, uri, what string, max int64, read func(io.Reader) error) error {
	rctx, rcancel := context.WithTimeout(ctx, m.cfg.IdleTimeout)
	defer rcancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, uri, nil)
	if err != nil {
		return backoff.Permanent(fmt.Errorf("bad URL: %w", err))
	}
	req.Header.Set("User-Agent", "gwagent")
	resp, err := m.cfg.HTTPClient.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		if permanentNetError(err) {
			return backoff.Permanent(netCause(err))
		}
		return netCause(err)
	}
	defer resp.Body.Close()
	status := "HTTP " + resp.Status
	switch {
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests, resp.StatusCode >= 500:
		e := errors.New(status)
		if d, ok := retryAfter(resp.Header.Get("Retry-After"), m.cfg.RetryMaxElapsed); ok {
			return &retryAfterError{err: e, ra: &backoff.RetryAfterError{Duration: d}}
		}
		return e
	default:
		return backoff.Permanent(errors.New(status))
	}
	cr := &countReader{r: io.LimitReader(resp.Body, max+1)}
	if err := read(cr); err != nil {
		if cr.err == nil { // not the network: the destination
			return backoff.Permanent(err)
		}
		return fmt.Errorf("read: %w", err)
	}
	if cr.n > max {
		return backoff.Permanent(fmt.Errorf("the %s is larger than %d bytes", what, max))
	}
	return nil
}

// countReader counts what it reads and keeps its read error.
type countReader struct {
	r   io.Reader
	n   int64
	err error
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if err != nil && err != io.EOF {
		c.err = err
	}
	return n, err
}

// checkManifest applies the signed update metadata of the trusted comment
// (authenticated by the caller) to this device: compatible, minVersion,
// downgrade, and the request's version. Failures are coded
// CodeIncompatible or CodeDowngrade.
func (m *Manager) checkManifest(req Request, sigText []byte) error {
	s, err := signature.ParseSignature(sigText)
	if err != nil {
		return coded(CodeVerify, err)
	}
	man, ok, err := signature.ParseManifest(s.TrustedComment)
	if err != nil {
		return coded(CodeIncompatible, err)
	}
	if !ok {
		if m.cfg.Compatible != "" && !m.cfg.Signatures.AllowUnsigned {
			return coded(CodeIncompatible, fmt.Errorf("%w: image signature carries no gwagent metadata (trusted comment %q; sign with gwctl image sign or minisign -t '%s{…}')",
				signature.ErrIncompatible, s.TrustedComment, signature.ManifestPrefix))
		}
		return nil
	}
	m.mu.Lock()
	running := m.rec.CurrentVersion
	m.mu.Unlock()
	if req.Version != "" && signature.CompareVersions(req.Version, man.Version) != 0 {
		return coded(CodeIncompatible, fmt.Errorf("%w: the request names version %s, the signed metadata %s",
			signature.ErrIncompatible, req.Version, man.Version))
	}
	if err := man.Check(m.cfg.Compatible, running); err != nil {
		if errors.Is(err, signature.ErrDowngrade) {
			return coded(CodeDowngrade, err)
		}
		return coded(CodeIncompatible, err)
	}
	m.log.Info("image metadata fits this device", zap.String("version", man.Version),
		zap.Strings("compatible", man.Compatible), zap.String("running", running))
	return nil
}
