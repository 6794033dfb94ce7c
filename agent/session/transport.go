package session

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/gorilla/websocket"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/iothub/wsstream"
)

// The transports of Config.Transport.
const (
	// TransportMQTT is MQTT 3.1.1 over TLS on 8883.
	TransportMQTT = "mqtt"
	// TransportWebSocket is MQTT 3.1.1 over a WebSocket (subprotocol
	// "mqtt") at wss://{host}:443/$iothub/websocket, for networks that
	// block 8883.
	TransportWebSocket = "websocket"
	// TransportAuto tries 8883 and falls back to the WebSocket after
	// Config.FallbackAfter network-level failures in a row; see autoState.
	TransportAuto = "auto"
)

// Transports are the values Config.Transport takes.
var Transports = []string{TransportAuto, TransportMQTT, TransportWebSocket}

// DefaultWebSocketPort is IoT Hub's MQTT-over-WebSocket port.
const DefaultWebSocketPort = "443"

// WebSocketPath is where IoT Hub serves MQTT over WebSocket.
const WebSocketPath = "/$iothub/websocket"

// networkError marks a connect attempt that failed before the hub could
// judge the device: refused, reset, silent, a proxy or an upgrade that said
// no. Only these count towards auto's fallback; a refused CONNECT or a
// certificate problem would fail the same way on the other transport.
type networkError struct{ err error }

func (e *networkError) Error() string { return e.err.Error() }
func (e *networkError) Unwrap() error { return e.err }

func isNetworkFailure(err error) bool {
	var ne *networkError
	return errors.As(err, &ne)
}

// classify wraps the error of a failed connect as a networkError when the
// hub never answered the CONNECT.
func classify(tok mqtt.Token, err error) error {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	var cv *tls.CertificateVerificationError
	if errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci) || errors.As(err, &cv) {
		return err
	}
	if ct, ok := tok.(*mqtt.ConnectToken); ok && ct.ReturnCode() >= 1 && ct.ReturnCode() <= 5 {
		return err
	}
	return &networkError{err}
}

// transportRecord is what auto remembers in Config.TransportFile: the
// transport of the last successful connect, and when a connect over it
// succeeded after 8883 had failed (the start of the 8883 probe interval).
type transportRecord struct {
	Transport string    `json:"transport"`
	Since     time.Time `json:"since"`
}

// autoState is auto's choice of transport. It starts with the remembered
// transport (8883 when nothing is remembered), switches to the other one
// after FallbackAfter network-level failures in a row, remembers a
// transport once a connect over it succeeds, and, while it remembers the
// WebSocket, tries 8883 once more at the first connect ProbeEvery after
// the fallback (at start, after a drop or at a token renewal); a probe
// that fails falls back at once. Owned by the connection loop.
type autoState struct {
	file          string
	fallbackAfter int
	probeEvery    time.Duration
	log           *zap.Logger

	current  string
	since    time.Time // of the remembered WebSocket choice
	fails    int       // network-level failures in a row on current
	probing  bool      // the attempt under way is a probe of 8883
	fellBack bool      // current was reached by falling back from 8883
}

func newAutoState(file string, fallbackAfter int, probeEvery time.Duration, log *zap.Logger) *autoState {
	a := &autoState{file: file, fallbackAfter: fallbackAfter, probeEvery: probeEvery, log: log, current: TransportMQTT}
	if file == "" {
		return a
	}
	b, err := os.ReadFile(file)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("cannot read the remembered transport; starting with 8883", zap.String("file", file), zap.Error(err))
		}
		return a
	}
	var r transportRecord
	if err := json.Unmarshal(b, &r); err != nil || (r.Transport != TransportMQTT && r.Transport != TransportWebSocket) {
		// An empty or torn file is a file not written.
		return a
	}
	a.current, a.since = r.Transport, r.Since
	return a
}

// next is the transport of the next attempt.
func (a *autoState) next(now time.Time) string {
	a.probing = false
	if a.current == TransportWebSocket && !a.since.IsZero() && now.Sub(a.since) >= a.probeEvery {
		a.probing = true
		return TransportMQTT
	}
	return a.current
}

// failed records a failed attempt over tr and reports whether to try the
// other transport at once.
func (a *autoState) failed(tr string, err error) bool {
	if !isNetworkFailure(err) {
		a.fails = 0
		return false
	}
	if a.probing {
		a.log.Info("8883 still fails; back to the WebSocket on 443", zap.Error(err))
		a.since = time.Now()
		a.save(TransportWebSocket, a.since)
		return true
	}
	a.fails++
	if a.fails < a.fallbackAfter {
		return false
	}
	other := TransportWebSocket
	if tr == TransportWebSocket {
		other = TransportMQTT
	}
	a.log.Warn("switching transport after failed attempts",
		zap.String("from", tr), zap.String("to", other), zap.Int("failures", a.fails))
	a.current, a.fails, a.fellBack = other, 0, other == TransportWebSocket
	return true
}

// connected records a successful connect over tr.
func (a *autoState) connected(tr string, now time.Time) {
	a.fails = 0
	switch {
	case tr == TransportMQTT && (a.current != TransportMQTT || a.probing || !a.since.IsZero()):
		a.current, a.since = TransportMQTT, time.Time{}
		a.save(TransportMQTT, time.Time{})
	case tr == TransportWebSocket && a.fellBack:
		a.current, a.since, a.fellBack = TransportWebSocket, now, false
		a.save(TransportWebSocket, now)
	}
	a.probing = false
}

func (a *autoState) save(tr string, since time.Time) {
	if a.file == "" {
		return
	}
	b, _ := json.Marshal(transportRecord{Transport: tr, Since: since})
	if err := atomicfile.WriteFile(a.file, append(b, '\n'), 0o600); err != nil {
		a.log.Warn("cannot remember the transport", zap.String("file", a.file), zap.Error(err))
	}
}

// dialAddr is the address transport tr dials.
func (s *Session) dialAddr(tr string) string {
	addr, _ := s.target(tr)
	return addr
}

// target is the address and URL a transport dials.
func (s *Session) target(tr string) (addr, broker string) {
	if tr == TransportWebSocket {
		return s.wsAddr, "wss://" + net.JoinHostPort(s.tlsName, DefaultWebSocketPort) + WebSocketPath
	}
	return s.addr, "tls://" + s.addr
}

// dialTLS is dialTCP and a TLS handshake bounded by ctx.
func (s *Session) dialTLS(ctx context.Context, addr string, cfg *tls.Config) (net.Conn, error) {
	return DialTLS(ctx, addr, cfg, s.cfg.Proxy)
}

func (s *Session) dialWebSocket(ctx context.Context, u string, addr string, cfg *tls.Config) (net.Conn, error) {
	return DialWebSocket(ctx, u, addr, cfg, s.cfg.Proxy)
}

// DialTCP opens a TCP connection to addr, through the HTTP proxy proxy
// returns for it (nil proxy, or a nil URL: directly).
func DialTCP(ctx context.Context, addr string, proxy func(target string) (*url.URL, error)) (net.Conn, error) {
	if proxy != nil {
		p, err := proxy(addr)
		if err != nil {
			return nil, err
		}
		if p != nil {
			return DialProxy(ctx, p, addr)
		}
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// DialTLS is DialTCP and a TLS handshake bounded by ctx.
func DialTLS(ctx context.Context, addr string, cfg *tls.Config, proxy func(target string) (*url.URL, error)) (net.Conn, error) {
	raw, err := DialTCP(ctx, addr, proxy)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, err
	}
	return tc, nil
}

// DialWebSocket opens MQTT over WebSocket: TLS to addr (verifying the
// server's name in cfg), then the upgrade of GET u (wss://{host}:443/$iothub/websocket)
// with subprotocol "mqtt". IoT Hub and DPS serve it alike.
func DialWebSocket(ctx context.Context, u string, addr string, cfg *tls.Config, proxy func(target string) (*url.URL, error)) (net.Conn, error) {
	d := websocket.Dialer{
		NetDialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return DialTLS(ctx, addr, cfg, proxy)
		},
		Subprotocols:    []string{"mqtt"},
		ReadBufferSize:  4096,
		WriteBufferSize: 4096,
	}
	ws, resp, err := d.DialContext(ctx, u, nil)
	if err != nil {
		if resp != nil {
			_ = resp.Body.Close()
		}
		if errors.Is(err, websocket.ErrBadHandshake) && resp != nil {
			return nil, fmt.Errorf("WebSocket upgrade at %s refused: %s (the server at %s does not serve MQTT over WebSocket there)", u, resp.Status, addr)
		}
		return nil, err
	}
	if ws.Subprotocol() != "mqtt" {
		_ = ws.Close()
		return nil, fmt.Errorf("WebSocket upgrade at %s: the server did not accept subprotocol mqtt", u)
	}
	return wsstream.New(ws, ws.NetConn()), nil
}

// ProxyError is a proxy's refusal of a CONNECT.
type ProxyError struct {
	Proxy      string // the proxy's URL without credentials
	Target     string
	StatusCode int
	Status     string
}

func (e *ProxyError) Error() string {
	hint := ""
	switch e.StatusCode {
	case http.StatusProxyAuthRequired, http.StatusUnauthorized:
		hint = " (the proxy wants credentials: check the proxy URL's user and the credentials file)"
	case http.StatusForbidden:
		hint = " (the proxy does not allow this target: many allow CONNECT to port 443 only)"
	}
	return fmt.Sprintf("proxy %s refused CONNECT %s: %s%s", e.Proxy, e.Target, e.Status, hint)
}

// ProxyName is the proxy's URL without credentials, for logs and errors.
func ProxyName(p *url.URL) string {
	u := *p
	u.User = nil
	return u.String()
}

// DialProxy opens a tunnel to target through the HTTP proxy p with
// CONNECT, sending p's user and password as basic credentials. ctx bounds
// the whole exchange.
func DialProxy(ctx context.Context, p *url.URL, target string) (net.Conn, error) {
	name := ProxyName(p)
	if p.Scheme != "http" {
		return nil, fmt.Errorf("proxy %s: only http:// proxies are supported", name)
	}
	host := p.Host
	if p.Port() == "" {
		host = net.JoinHostPort(p.Hostname(), "80")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", name, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: target},
		Host:   target,
		Header: http.Header{},
	}
	if u := p.User; u != nil {
		pw, _ := u.Password()
		req.SetBasicAuth(u.Username(), pw)
		req.Header["Proxy-Authorization"] = req.Header["Authorization"]
		delete(req.Header, "Authorization")
	}
	fail := func(err error) (net.Conn, error) {
		_ = c.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("proxy %s: CONNECT %s: %w", name, target, err)
	}
	if err := req.Write(c); err != nil {
		return fail(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fail(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_ = c.Close()
		return nil, &ProxyError{Proxy: name, Target: target, StatusCode: resp.StatusCode, Status: resp.Status}
	}
	_ = c.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		return &bufferedConn{Conn: c, r: br}, nil
	}
	return c, nil
}

// bufferedConn is a tunnel whose first bytes were read with the proxy's
// answer.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
