package hub

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
)

// Defaults of the connection limits in Config.
const (
	DefaultConnectTimeout       = 20 * time.Second
	DefaultReadTimeout          = time.Minute
	DefaultMaxPreAuthConns      = 1024
	DefaultMaxPreAuthConnsPerIP = 64
)

// logEvery is the shortest interval between two log lines about the same
// kind of trouble (accept errors, connections over a cap): under attack the
// log must not grow by a line per connection.
const logEvery = 10 * time.Second

// Backoff of a listener whose Accept fails (out of file descriptors, say):
// it keeps trying, never faster than acceptRetryMin, never slower than
// acceptRetryMax, and is back at full speed after one success.
const (
	acceptRetryMin = 5 * time.Millisecond
	acceptRetryMax = time.Second
)

// logLimiter lets one line through per interval and counts the others.
type logLimiter struct {
	every time.Duration

	mu         sync.Mutex // guards last, suppressed
	last       time.Time
	suppressed int
}

// allow reports whether to log now, and how many lines were held back
// since the last one that was let through.
func (l *logLimiter) allow(now time.Time) (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		return 0, false
	}
	n := l.suppressed
	l.last, l.suppressed = now, 0
	return n, true
}

// gate counts connections that have not authenticated yet, in all and per
// remote IP, and refuses those over a cap. A device holds its place from
// accept until the hub accepts its CONNECT; an HTTPS client until its first
// request arrives; every connection gives it up when it closes.
type gate struct {
	max, perIP int
	log        *zap.Logger
	refusals   logLimiter

	mu    sync.Mutex // guards total, byIP
	total int
	byIP  map[string]int
}

func newGate(max, perIP int, log *zap.Logger) *gate {
	return &gate{max: max, perIP: perIP, log: log, refusals: logLimiter{every: logEvery}, byIP: map[string]int{}}
}

// admit takes a place for a new connection from addr. It returns the
// function that gives the place back (safe to call more than once), or
// false when a cap is reached; the caller then closes the connection.
func (g *gate) admit(addr net.Addr) (func(), bool) {
	ip := remoteIP(addr)
	g.mu.Lock()
	total, n := g.total, g.byIP[ip]
	ok := total < g.max && n < g.perIP
	if ok {
		g.total++
		g.byIP[ip]++
	}
	g.mu.Unlock()
	if !ok {
		if held, log := g.refusals.allow(time.Now()); log {
			g.log.Warn("closing new connections: too many that have not authenticated",
				zap.String("remote_ip", ip), zap.Int("pending", total), zap.Int("pending_from_ip", n),
				zap.Int("max", g.max), zap.Int("max_per_ip", g.perIP), zap.Int("refused_since_last_report", held))
		}
		return nil, false
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.total--
			if g.byIP[ip]--; g.byIP[ip] <= 0 {
				delete(g.byIP, ip)
			}
		})
	}, true
}

// pending is the number of connections holding a place.
func (g *gate) pending() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.total
}

func remoteIP(addr net.Addr) string {
	if a, ok := addr.(*net.TCPAddr); ok {
		return a.IP.String()
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	return host
}

// authenticated is implemented by the connections the gate counts: the
// CONNECT hook calls it once the device is in, to give the place back.
type authenticated interface{ authenticated() }

// connSet holds a listener's live connections, so that closing the
// listener also closes those still before their CONNECT, which the broker
// does not know yet and would otherwise wait for.
type connSet struct {
	mu     sync.Mutex // guards conns, closed
	conns  map[net.Conn]struct{}
	closed bool
}

// add records c; it reports false once the set is closed.
func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = map[net.Conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *connSet) remove(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

// closeAll closes every connection and refuses new ones.
func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for c := range conns {
		_ = c.Close()
	}
}

// mqttConn is a device's TLS connection as the broker sees it. It holds a
// place in the gate until the device authenticates or the connection
// closes.
type mqttConn struct {
	*tls.Conn // ConnectionState gives the X.509 hook the client certificate
	release   func()
	set       *connSet
}

func (c *mqttConn) authenticated() { c.release() }

func (c *mqttConn) Close() error {
	c.release()
	c.set.remove(c)
	return c.Conn.Close()
}

// tlsListener is the broker's MQTT-over-TLS listener. Unlike the broker's
// own TCP listener it survives failing accepts (it backs off and tries
// again, so the hub takes connections again once descriptors are free),
// bounds the TLS handshake and CONNECT of every connection by a deadline,
// and lets the gate refuse connections over its caps.
type tlsListener struct {
	id, addr string
	tlsCfg   *tls.Config
	timeout  time.Duration // TLS handshake + CONNECT
	gate     *gate
	log      *zap.Logger

	ln        net.Listener // set by Init
	conns     connSet
	acceptLog logLimiter
	done      chan struct{} // closed by Close
	closeOnce sync.Once
}

func newTLSListener(id, addr string, tlsCfg *tls.Config, timeout time.Duration, g *gate, log *zap.Logger) *tlsListener {
	return &tlsListener{id: id, addr: addr, tlsCfg: tlsCfg, timeout: timeout, gate: g, log: log,
		acceptLog: logLimiter{every: logEvery}, done: make(chan struct{})}
}

func (l *tlsListener) ID() string       { return l.id }
func (l *tlsListener) Protocol() string { return "tcp" }

func (l *tlsListener) Address() string {
	if l.ln != nil {
		return l.ln.Addr().String()
	}
	return l.addr
}

// Init binds the address. The broker calls it from AddListener.
func (l *tlsListener) Init(*slog.Logger) error {
	ln, err := net.Listen("tcp", l.addr)
	if err != nil {
		return err
	}
	l.ln = ln
	return nil
}

// Serve accepts until Close. A failed Accept is retried with backoff: the
// usual cause is a process out of descriptors, which passes as connections
// end.
func (l *tlsListener) Serve(establish listeners.EstablishFn) {
	b := retry.NewBackoff(acceptRetryMin, acceptRetryMax)
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			select {
			case <-l.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			wait := retry.Next(b)
			if held, log := l.acceptLog.allow(time.Now()); log {
				l.log.Error("MQTT listener cannot accept connections, retrying", zap.Error(err),
					zap.Duration("retry_in", wait), zap.Int("failures_since_last_report", held))
			}
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-l.done:
				t.Stop()
				return
			}
			continue
		}
		b.Reset()
		release, ok := l.gate.admit(raw.RemoteAddr())
		if !ok {
			_ = raw.Close()
			continue
		}
		// Covers the handshake, which runs on the first read, and the
		// CONNECT; the broker sets the keep-alive deadline after it.
		_ = raw.SetDeadline(time.Now().Add(l.timeout))
		c := &mqttConn{Conn: tls.Server(raw, l.tlsCfg), release: release, set: &l.conns}
		if !l.conns.add(c) {
			_ = c.Close()
			return
		}
		go func() {
			defer c.Close()
			if err := establish(l.id, c); err != nil {
				l.log.Debug("MQTT connection ended", zap.String("remote", raw.RemoteAddr().String()), zap.Error(err))
			}
		}()
	}
}

// Close stops accepting and closes every connection of the listener.
func (l *tlsListener) Close(closeClients listeners.CloseFn) {
	l.closeOnce.Do(func() {
		close(l.done)
		if l.ln != nil {
			_ = l.ln.Close()
		}
	})
	closeClients(l.id)
	l.conns.closeAll()
}
