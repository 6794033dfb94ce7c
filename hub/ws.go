package hub

import (
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub/wsstream"
)

// wsListener lets the broker accept MQTT-over-WebSocket connections that
// arrive through an HTTP handler (on the HTTPS listener or on a listener of
// their own). The broker sees it as one of its listeners, so closing the
// broker also closes these clients.
type wsListener struct {
	id string

	mu        sync.Mutex // guards establish, closed
	establish listeners.EstablishFn
	closed    bool
	done      chan struct{} // closed by Close; Serve returns then
	conns     connSet       // live connections, closed with the listener
}

func newWSListener(id string) *wsListener {
	return &wsListener{id: id, done: make(chan struct{})}
}

func (l *wsListener) Init(*slog.Logger) error { return nil }
func (l *wsListener) ID() string              { return l.id }
func (l *wsListener) Address() string         { return WebSocketPath }
func (l *wsListener) Protocol() string        { return "wss" }

func (l *wsListener) Serve(establish listeners.EstablishFn) {
	l.mu.Lock()
	l.establish = establish
	l.mu.Unlock()
	<-l.done
}

func (l *wsListener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		close(l.done)
	}
	l.mu.Unlock()
	closeClients(l.id)
	l.conns.closeAll()
}

// errWSClosed is returned when a WebSocket arrives while the broker stops.
var errWSClosed = errors.New("hub: WebSocket listener closed")

func (l *wsListener) serve(c *wsConn) error {
	l.mu.Lock()
	est, closed := l.establish, l.closed
	l.mu.Unlock()
	if closed || est == nil || !l.conns.add(c) {
		return errWSClosed
	}
	defer l.conns.remove(c)
	return est(l.id, c)
}

var wsUpgrader = websocket.Upgrader{
	Subprotocols:    []string{"mqtt"},
	ReadBufferSize:  4096,
	WriteBufferSize: 4096,
	// Devices are not browsers; there is no origin to check.
	CheckOrigin: func(*http.Request) bool { return true },
}

// serveWebSocket upgrades the request and runs the MQTT session over it
// until the client goes away.
func (h *Hub) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	if h.wsLn == nil {
		http.NotFound(w, r)
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		http.Error(w, "MQTT over WebSocket only", http.StatusBadRequest)
		return
	}
	up := wsUpgrader
	up.HandshakeTimeout = h.cfg.ConnectTimeout
	c, err := up.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered
	}
	raw := c.UnderlyingConn()
	release, ok := h.gate.admit(raw.RemoteAddr())
	if !ok {
		_ = raw.Close()
		return
	}
	// The HTTP server bounded the handshake and the upgrade request; this
	// bounds the CONNECT. The broker sets the keep-alive deadline after it.
	_ = raw.SetDeadline(time.Now().Add(h.cfg.ConnectTimeout))
	conn := &wsConn{Conn: wsstream.New(c, raw), release: release}
	if tc, ok := raw.(*tls.Conn); ok {
		conn.tls = tc
	}
	defer conn.Close()
	if err := h.wsLn.serve(conn); err != nil && !errors.Is(err, io.EOF) {
		h.log.Debug("WebSocket client ended", zap.Error(err))
	}
}

// wsConn is a WebSocket client of the broker: the MQTT byte stream
// (wsstream), its TLS state and its place in the pre-auth gate.
type wsConn struct {
	*wsstream.Conn
	tls     *tls.Conn // for the client certificate; nil without TLS
	release func()    // gives back the connection's place in the gate
}

func (c *wsConn) authenticated() { c.release() }

func (c *wsConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// ConnectionState exposes the TLS state, with the client certificate, so
// X.509 devices can connect over WebSocket too; it is the zero state
// without TLS. Its signature is tls.Conn's, which checkThumbprint asks for.
func (c *wsConn) ConnectionState() tls.ConnectionState {
	if c.tls == nil {
		return tls.ConnectionState{}
	}
	return c.tls.ConnectionState()
}
