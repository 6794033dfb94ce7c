package service

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/iothub"
)

// Defaults of Options.
const (
	DefaultTokenTTL       = time.Hour
	DefaultRequestTimeout = 60 * time.Second
	DefaultUserAgent      = "gwagent-service/1"
	// methodTimeoutMargin is added to connect+response timeouts for the HTTP
	// deadline of a method call: the hub answers 404103/504101 itself when
	// those run out, and cutting the call earlier would hide that answer.
	methodTimeoutMargin = 15 * time.Second
	maxResponseBody     = 16 << 20
)

// ErrInvalid is wrapped by errors about a bad argument or option, found
// before any request is sent.
var ErrInvalid = errors.New("service: invalid argument")

// RetryPolicy bounds the retries of one call. Zero fields take the defaults.
type RetryPolicy struct {
	MaxTries        uint          // attempts in all, default 5; 1 disables retries
	InitialInterval time.Duration // default 500ms
	MaxInterval     time.Duration // default 10s
	MaxElapsed      time.Duration // default 2m
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxTries == 0 {
		p.MaxTries = 5
	}
	if p.InitialInterval <= 0 {
		p.InitialInterval = 500 * time.Millisecond
	}
	if p.MaxInterval <= 0 {
		p.MaxInterval = 10 * time.Second
	}
	if p.MaxElapsed <= 0 {
		p.MaxElapsed = 2 * time.Minute
	}
	return p
}

// Options configure a Client. The zero value talks to https://{HostName} with
// the system roots.
type Options struct {
	// HTTPClient, when set, is used for every call (its Transport decides TLS);
	// CAFile is then ignored. A Timeout on it is raised for method calls that
	// need longer.
	HTTPClient *http.Client
	// CAFile is a PEM bundle of the roots to trust instead of the system
	// roots (for example the local hub's ca.pem).
	CAFile string
	// TokenTTL is the lifetime of the SAS tokens minted from the policy key.
	TokenTTL time.Duration
	// UserAgent is sent on every request.
	UserAgent string
	// RequestTimeout bounds each attempt of a call other than a method call.
	RequestTimeout time.Duration
	// Retry bounds retries of throttled and failed calls.
	Retry RetryPolicy
	// Log receives retry and token events at debug level. Nil means no logs.
	Log *zap.Logger
	// BaseURL replaces https://{HostName} (scheme, host and port only). It is
	// meant for tests that serve the API on a random loopback port; the real
	// service is always https://{HostName} on 443, and the SAS resource stays
	// HostName either way.
	BaseURL string

	now func() time.Time // tests of token renewal replace it
}

// Client calls IoT Hub's service REST API. It is safe for concurrent use.
type Client struct {
	host      string
	base      string // https://host, no trailing slash
	hc        *http.Client
	apiVer    string // api-version of every call
	tokens    *tokenSource
	userAgent string
	timeout   time.Duration
	retry     RetryPolicy
	log       *zap.Logger
}

// New builds a Client from a service connection string
// (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…).
func New(cs iothub.ConnectionString, opts Options) (*Client, error) {
	if !cs.IsService() {
		return nil, fmt.Errorf("%w: a service connection string (HostName, SharedAccessKeyName, SharedAccessKey) is required", ErrInvalid)
	}
	if opts.TokenTTL <= 0 {
		opts.TokenTTL = DefaultTokenTTL
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	tokens, err := newTokenSource(cs, opts.TokenTTL, opts.now)
	if err != nil {
		return nil, err
	}
	c := &Client{
		host:      cs.HostName,
		base:      "https://" + cs.HostName,
		hc:        opts.HTTPClient,
		apiVer:    iothub.APIVersion,
		tokens:    tokens,
		userAgent: opts.UserAgent,
		timeout:   opts.RequestTimeout,
		retry:     opts.Retry.withDefaults(),
		log:       opts.Log,
	}
	if c.userAgent == "" {
		c.userAgent = DefaultUserAgent
	}
	if c.timeout <= 0 {
		c.timeout = DefaultRequestTimeout
	}
	if c.log == nil {
		c.log = zap.NewNop()
	}
	if opts.BaseURL != "" {
		u, err := url.Parse(opts.BaseURL)
		if err != nil || u.Scheme == "" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return nil, fmt.Errorf("%w: base URL %q must be scheme://host[:port]", ErrInvalid, opts.BaseURL)
		}
		c.base = u.Scheme + "://" + u.Host
	}
	if c.hc == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		if opts.CAFile != "" {
			pem, err := os.ReadFile(opts.CAFile)
			if err != nil {
				return nil, fmt.Errorf("service: CA file: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%w: CA file %s holds no PEM certificate", ErrInvalid, opts.CAFile)
			}
			tr.TLSClientConfig.RootCAs = pool
		}
		c.hc = &http.Client{Transport: tr, CheckRedirect: refuseRedirect}
	}
	return c, nil
}

// refuseRedirect stops every redirect: IoT Hub's service API never answers
// with one, and following it could carry the hub-wide token somewhere else,
// or in clear text.
func refuseRedirect(req *http.Request, _ []*http.Request) error {
	return fmt.Errorf("%w: the hub answered with a redirect to %s; not following it with the service token", ErrInvalid, req.URL.Redacted())
}

// HostName is the hub's host name from the connection string.
func (c *Client) HostName() string { return c.host }

// CloseIdleConnections closes kept-alive connections (for a clean exit and
// leak-checked tests).
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// request is one logical API call; do sends it, retrying as it allows.
type request struct {
	method     string
	path       string // already escaped
	query      url.Values
	body       []byte // JSON, nil for none
	header     http.Header
	idempotent bool          // safe to repeat after an ambiguous failure (timeout, 504)
	timeout    time.Duration // per attempt; 0 = the client's
	noRetry    bool          // the caller runs its own backoff
}

type response struct {
	status int
	header http.Header
	body   []byte
}

// retryAfterBackOff lets a Retry-After answer stretch the next wait of the
// library backoff without hiding the error the retry loop returns at the end.
type retryAfterBackOff struct {
	backoff.BackOff
	hint time.Duration
}

func (b *retryAfterBackOff) NextBackOff() time.Duration {
	d := b.BackOff.NextBackOff()
	if d != backoff.Stop && b.hint > d {
		d = b.hint
	}
	b.hint = 0
	return d
}

func (c *Client) do(ctx context.Context, r request) (*response, error) {
	p := c.retry
	if r.noRetry {
		p.MaxTries = 1
	}
	eb := retry.NewBackoff(p.InitialInterval, p.MaxInterval)
	bo := &retryAfterBackOff{BackOff: eb}
	attempt := 0
	op := func() (*response, error) {
		attempt++
		resp, err := c.once(ctx, r)
		if err != nil {
			if ctx.Err() == nil && !permanentTransport(err) && (r.idempotent || isDialError(err)) {
				return nil, err
			}
			return nil, backoff.Permanent(err)
		}
		if resp.status < 300 {
			return resp, nil
		}
		se := iothub.ParseServiceError(resp.status, resp.body)
		var serr error = se
		if hint := retryAfter(resp.header); hint > 0 {
			bo.hint = hint
			serr = &hintedError{error: se, after: hint}
		}
		if !retryable(se, r.idempotent) {
			return nil, backoff.Permanent(serr)
		}
		return nil, serr
	}
	resp, err := backoff.Retry(ctx, op,
		backoff.WithBackOff(bo),
		backoff.WithMaxTries(p.MaxTries),
		backoff.WithMaxElapsedTime(p.MaxElapsed),
		backoff.WithNotify(func(err error, wait time.Duration) {
			c.log.Debug("retrying service call", zap.String("method", r.method), zap.String("path", r.path),
				zap.Int("attempt", attempt), zap.Duration("wait", wait), zap.Error(err))
		}))
	if err != nil {
		var perm *backoff.PermanentError
		if errors.As(err, &perm) {
			err = perm.Err
		}
		return nil, err
	}
	return resp, nil
}

// retryable: throttling and server errors are worth another try. A 504 from
// a method call means the device may have run the method, so only
// idempotent calls repeat it.
func retryable(e *iothub.ServiceError, idempotent bool) bool {
	switch {
	case e.HTTPStatus == http.StatusTooManyRequests:
		return true
	case e.HTTPStatus == http.StatusRequestTimeout, e.HTTPStatus == http.StatusGatewayTimeout, e.Code == iothub.CodeGatewayTimeout:
		return idempotent
	case e.HTTPStatus >= 500:
		return true
	}
	return false
}

// hintedError is a failed call whose answer said when to try again
// (Retry-After). It unwraps to the *iothub.ServiceError.
type hintedError struct {
	error
	after time.Duration
}

func (e *hintedError) Unwrap() error { return e.error }

// RetryAfter is the wait the hub asked for in a Retry-After header of the
// failed call err, or 0.
func RetryAfter(err error) time.Duration {
	var h *hintedError
	if errors.As(err, &h) {
		return h.after
	}
	return 0
}

// maxRetryAfter caps the hub's Retry-After so a bad header cannot park a
// call for hours; the retry policy's MaxElapsed still bounds the whole call.
const maxRetryAfter = time.Minute

func retryAfter(h http.Header) time.Duration {
	s, err := strconv.Atoi(strings.TrimSpace(h.Get("Retry-After")))
	if err != nil || s <= 0 {
		return 0
	}
	return min(time.Duration(s)*time.Second, maxRetryAfter)
}

// permanentTransport: failures that another attempt cannot fix (an
// untrusted certificate, an expired fixed token).
func permanentTransport(err error) bool {
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	return errors.Is(err, iothub.ErrSASExpired) || errors.As(err, &cv) || errors.As(err, &ua) ||
		errors.As(err, &hn) || errors.As(err, &ci)
}

// isDialError: the request never left this machine, so even a
// non-idempotent call can be sent again.
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

func (c *Client) once(ctx context.Context, r request) (*response, error) {
	timeout := r.timeout
	if timeout <= 0 {
		timeout = c.timeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	q := url.Values{}
	for k, v := range r.query {
		q[k] = v
	}
	q.Set("api-version", c.apiVer)
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, c.base+r.path+"?"+q.Encode(), body)
	if err != nil {
		return nil, fmt.Errorf("service: %s %s: %w", r.method, r.path, err)
	}
	tok, err := c.tokens.Token()
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", tok)
	req.Header.Set("User-Agent", c.userAgent)
	req.Header.Set("Accept", "application/json")
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	hc := c.hc
	if hc.Timeout > 0 && hc.Timeout < timeout {
		// A caller's client timeout shorter than the call needs (a method call
		// waiting for a device) would cut off the hub's own answer.
		cp := *hc
		cp.Timeout = timeout
		hc = &cp
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("service: %s %s: %w", r.method, r.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody))
	if err != nil {
		return nil, fmt.Errorf("service: %s %s: reading the answer: %w", r.method, r.path, err)
	}
	return &response{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

// call sends r and decodes a JSON answer into out (when non-nil).
func (c *Client) call(ctx context.Context, r request, out any) (*response, error) {
	resp, err := c.do(ctx, r)
	if err != nil {
		return nil, err
	}
	if out != nil {
		dec := json.NewDecoder(bytes.NewReader(resp.body))
		dec.UseNumber() // twin numbers stay exact (IoT Hub allows ±2^52)
		if err := dec.Decode(out); err != nil {
			return nil, fmt.Errorf("service: %s %s: decoding the answer: %w", r.method, r.path, err)
		}
	}
	return resp, nil
}

func ifMatch(etag string) http.Header {
	if etag == "" {
		return nil
	}
	if etag != "*" && !strings.HasPrefix(etag, `"`) {
		etag = `"` + etag + `"`
	}
	return http.Header{"If-Match": {etag}}
}

// Code is the IoT Hub error code carried by err (404103, 429001, …), or 0.
func Code(err error) int {
	var se *iothub.ServiceError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

// HTTPStatus is the HTTP status of the failed call carried by err, or 0.
func HTTPStatus(err error) int {
	var se *iothub.ServiceError
	if errors.As(err, &se) {
		return se.HTTPStatus
	}
	return 0
}
