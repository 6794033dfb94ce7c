package session

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/router"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/iothub"
)

// DefaultPort is IoT Hub's MQTT-over-TLS port.
const DefaultPort = "8883"

// renewFraction is how much of a minted SAS token's lifetime is used before a
// planned reconnect with a fresh one (the C SDK's SAS_REFRESH_MULTIPLIER).
const renewFraction = 0.8

var (
	// ErrTimeout is returned when the hub does not answer a twin request in
	// Config.RequestTimeout. It is transient: the request may be retried.
	ErrTimeout = errors.New("session: no answer from the hub")
	// ErrClosed is returned by Run when it is called twice.
	ErrClosed = errors.New("session: already run")
)

// Desired is a change of desired properties.
type Desired struct {
	// Doc is a merge patch, or with Full the whole desired section read by
	// the twin GET after a connect (keys absent from it are not desired any
	// more). It never holds "$version".
	Doc map[string]any
	// Version is the desired $version of Doc.
	Version int64
	Full    bool
	// Reported is, with Full, the reported section the same GET returned
	// (without "$version"), e.g. to withdraw stale acknowledgements.
	Reported map[string]any
}

// DesiredFunc receives desired properties, in the hub's order, on one
// goroutine.
type DesiredFunc func(Desired)

// IdentityFunc supplies the device identity before a connect: at the
// first connect (rejected nil) and again after the hub refused the current
// one (rejected says how). An error is retried with the session's backoff
// and shown as the session's LastError.
type IdentityFunc func(ctx context.Context, rejected error) (iothub.ConnectionString, error)

// ErrRejected is wrapped by connect errors where the hub refused the
// identity itself (CONNACK 3, 4 or 5: disabled, bad credentials, unknown
// device).
var ErrRejected = errors.New("session: the hub refused the device identity")

// Config configures a Session. Conn or Identity is required; zero durations
// take the defaults noted.
type Config struct {
	Conn iothub.ConnectionString
	// Identity, when set, replaces Conn: it is asked for the identity
	// before the first connect and after every refusal (DPS provisioning).
	Identity IdentityFunc
	// Address is "host:port" to dial; empty means GatewayHostName (or
	// HostName) on DefaultPort. TLS verifies GatewayHostName or HostName.
	Address string
	// Transport is TransportMQTT, TransportWebSocket or TransportAuto (the
	// default).
	Transport string
	// WebSocketAddress is "host:port" to dial for the WebSocket transport;
	// empty means GatewayHostName (or HostName) on DefaultWebSocketPort.
	// TLS verifies the name, and the upgrade asks for it, whatever this is.
	WebSocketAddress string
	// Proxy returns the HTTP proxy for a "host:port" target, or nil for a
	// direct connection; nil means never a proxy. Both transports tunnel
	// through it with CONNECT.
	Proxy func(target string) (*url.URL, error)
	// TransportFile is where auto remembers the transport that worked;
	// empty means it starts with 8883 every time.
	TransportFile string
	// FallbackAfter is how many network-level connect failures in a row
	// make auto try the other transport (default 2).
	FallbackAfter int
	// ProbeEvery is how long after falling back to the WebSocket auto tries
	// 8883 again, at the next connect (default 24h).
	ProbeEvery time.Duration
	// RootCAs verifies the server; nil means the system roots.
	RootCAs *x509.CertPool
	// Certificate is the client certificate for x509=true identities.
	Certificate *tls.Certificate

	KeepAlive      time.Duration // default 120s
	SASTTL         time.Duration // default 1h
	ConnectTimeout time.Duration // default 30s
	RequestTimeout time.Duration // default 30s
	MinRetryDelay  time.Duration // default 1s
	MaxRetryDelay  time.Duration // default 60s

	// ClientType goes into the username's DeviceClientType.
	ClientType string
	// ModelID is the IoT Plug and Play model id, sent as the username's
	// model-id; empty: none.
	ModelID string
	// MaxMethodCalls bounds the method calls in flight (default 12); calls
	// beyond it are answered 503 at once.
	MaxMethodCalls int

	Log *zap.Logger
	// Methods answers direct methods; nil answers every call 501.
	Methods   Methods
	OnDesired DesiredFunc
	// OnConnect runs on the connection goroutine after every connect, once
	// the subscriptions are in place and the twin GET has been answered (or
	// failed). It must return quickly (e.g. wake the reported-patch queue).
	OnConnect func()
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.KeepAlive, 120*time.Second)
	def(&c.SASTTL, time.Hour)
	def(&c.ConnectTimeout, 30*time.Second)
	def(&c.RequestTimeout, 30*time.Second)
	def(&c.MinRetryDelay, time.Second)
	def(&c.MaxRetryDelay, 60*time.Second)
	def(&c.ProbeEvery, 24*time.Hour)
	if c.FallbackAfter <= 0 {
		c.FallbackAfter = 2
	}
	if c.Transport == "" {
		c.Transport = TransportAuto
	}
	if c.MaxRetryDelay < c.MinRetryDelay {
		c.MaxRetryDelay = c.MinRetryDelay
	}
	if c.MaxMethodCalls <= 0 {
		c.MaxMethodCalls = 12
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.Methods == nil {
		c.Methods = noMethods{}
	}
	if c.OnDesired == nil {
		c.OnDesired = func(Desired) {}
	}
	if c.OnConnect == nil {
		c.OnConnect = func() {}
	}
}

// Health is a snapshot of the session for status lines and health checks.
type Health struct {
	Connected bool
	// Host is the hub (or gateway) name.
	Host string
	// Transport is the transport of the connection, or of the attempt
	// under way when offline (TransportMQTT or TransportWebSocket).
	Transport string
	// Since is when the session last connected or went offline.
	Since time.Time
	// LastExchange is when the hub last sent anything or acknowledged a
	// request; zero if never.
	LastExchange time.Time
	// RetryAt is when the next connect attempt starts (offline only).
	RetryAt time.Time
	// LastError says why the last connect attempt or connection failed.
	LastError string
	// Connects counts successful connects, Renewals planned reconnects for
	// a fresh token, Drops connections lost.
	Connects, Renewals, Drops int
}

// Describe is the health as a short line a person can read, e.g.
// "connected to hub.example.net" or "offline, retrying in 8s".
func (h Health) Describe(now time.Time) string {
	switch {
	case h.Connected:
		if h.Transport == TransportWebSocket {
			return "connected to " + h.Host + " over WebSocket"
		}
		return "connected to " + h.Host
	case !h.RetryAt.IsZero() && h.RetryAt.After(now):
		return fmt.Sprintf("offline, retrying in %s", h.RetryAt.Sub(now).Round(time.Second))
	case h.LastError != "":
		return "connecting to " + h.Host + " (last attempt failed)"
	default:
		return "connecting to " + h.Host
	}
}

// Session is one device's session with the hub. Create it with New and run
// it with Run; PatchReported may be called from any goroutine.
type Session struct {
	cfg       Config
	log       *zap.Logger
	addr      string     // dial address of MQTT over TLS
	wsAddr    string     // dial address of MQTT over WebSocket
	auto      *autoState // nil unless cfg.Transport is auto; owned by the loop
	tlsName   string     // name TLS verifies
	clientID  string
	username  string
	ridPrefix string
	keepAlive keepAlive // paho's ping schedule for cfg.KeepAlive
	ridSeq    atomic.Uint64
	lastExch  atomic.Int64 // unix nanos of the last message from the hub
	draining  atomic.Bool  // answer new method calls 503
	started   atomic.Bool

	runCtx       context.Context    // Run's ctx, set before the first connect
	callSlots    chan struct{}      // one token per method call in flight
	calls        sync.WaitGroup     // method call goroutines
	desired      chan desiredMsg    // hub order → the desired worker
	resync       chan struct{}      // cap 1: the desired queue overflowed, GET again
	probeLoop    chan chan struct{} // health probes of the connection loop
	probeDesired chan chan struct{} // health probes of the desired worker
	changed      chan struct{}      // cap 1: Health changed

	// identified is false until Identity gave the identity in use (loop
	// goroutine only); rejected is the hub's last refusal of it.
	identified bool
	rejected   error

	mu      sync.Mutex          // guards cur, pending, health
	cur     *conn               // the live connection; nil offline
	pending map[string]*pending // twin requests awaiting $iothub/twin/res
	health  Health
}

// New checks cfg and prepares a session; nothing connects until Run.
func New(cfg Config) (*Session, error) {
	cfg.setDefaults()
	if !slices.Contains(Transports, cfg.Transport) {
		return nil, fmt.Errorf("session: unknown transport %q (known: %s)", cfg.Transport, strings.Join(Transports, ", "))
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("session: rid prefix: %w", err)
	}
	s := &Session{
		cfg:          cfg,
		log:          cfg.Log,
		ridPrefix:    hex.EncodeToString(b[:]) + "-",
		keepAlive:    keepAliveFor(cfg.KeepAlive),
		callSlots:    make(chan struct{}, cfg.MaxMethodCalls),
		desired:      make(chan desiredMsg, 32),
		resync:       make(chan struct{}, 1),
		probeLoop:    make(chan chan struct{}),
		probeDesired: make(chan chan struct{}),
		changed:      make(chan struct{}, 1),
		pending:      map[string]*pending{},
		health:       Health{Since: time.Now(), Transport: cfg.Transport},
	}
	switch cfg.Transport {
	case TransportAuto:
		s.auto = newAutoState(cfg.TransportFile, cfg.FallbackAfter, cfg.ProbeEvery, s.log)
		s.health.Transport = s.auto.current
	}
	if cfg.Identity == nil {
		if err := s.setIdentity(cfg.Conn); err != nil {
			return nil, err
		}
		s.identified = true
	}
	return s, nil
}

// setIdentity checks a device identity and derives what the connects use
// from it. It runs in New or on the loop goroutine, which alone reads these
// fields.
func (s *Session) setIdentity(cs iothub.ConnectionString) error {
	if cs.HostName == "" || cs.DeviceID == "" {
		return errors.New("session: the connection string needs HostName and DeviceId")
	}
	if cs.IsService() {
		return errors.New("session: a service connection string cannot connect as a device")
	}
	if cs.X509 && s.cfg.Certificate == nil {
		return errors.New("session: x509=true needs a client certificate")
	}
	if !cs.X509 && cs.SharedAccessKey == "" && cs.SharedAccessSignature == "" {
		return errors.New("session: no credentials (SharedAccessKey, SharedAccessSignature or x509=true)")
	}
	host := cs.HostName
	if cs.GatewayHostName != "" {
		host = cs.GatewayHostName
	}
	addr := s.cfg.Address
	if addr == "" {
		addr = net.JoinHostPort(host, DefaultPort)
	}
	wsAddr := s.cfg.WebSocketAddress
	if wsAddr == "" {
		wsAddr = net.JoinHostPort(host, DefaultWebSocketPort)
	}
	id := cs.DeviceID
	if cs.ModuleID != "" {
		// Module identities use "{device}/{module}" as client id and in the
		// username (ids are never URL-encoded there).
		id += "/" + cs.ModuleID
	}
	s.cfg.Conn = cs
	s.addr, s.wsAddr, s.tlsName, s.clientID = addr, wsAddr, host, id
	s.username = iothub.Username(cs.HostName, id, s.cfg.ClientType)
	if s.cfg.ModelID != "" {
		s.username += "&model-id=" + url.QueryEscape(s.cfg.ModelID)
	}
	s.mu.Lock()
	s.health.Host = host
	s.mu.Unlock()
	return nil
}

// identify asks Config.Identity for the identity when the session has none
// or the hub refused it.
func (s *Session) identify(ctx context.Context) error {
	if s.identified && s.rejected == nil {
		return nil
	}
	if s.cfg.Identity == nil {
		return nil // a fixed identity: a refusal is retried as it is
	}
	cs, err := s.cfg.Identity(ctx, s.rejected)
	if err != nil {
		return err
	}
	if err := s.setIdentity(cs); err != nil {
		return err
	}
	s.identified, s.rejected = true, nil
	return nil
}

// Health returns a snapshot of the session's state.
func (s *Session) Health() Health {
	s.mu.Lock()
	h := s.health
	s.mu.Unlock()
	if n := s.lastExch.Load(); n != 0 {
		h.LastExchange = time.Unix(0, n)
	}
	return h
}

// Changed is signalled (coalesced) whenever Health changes.
func (s *Session) Changed() <-chan struct{} { return s.changed }

// Drain makes the session answer new method calls with 503 while the agent
// stops; twin requests keep working so the queue can flush.
func (s *Session) Drain() { s.draining.Store(true) }

// Probe checks that the session's connection loop and desired worker are
// responsive. It is the watchdog's health check: a wedged loop fails it.
func (s *Session) Probe(ctx context.Context) error {
	for _, ch := range []chan chan struct{}{s.probeLoop, s.probeDesired} {
		reply := make(chan struct{})
		select {
		case ch <- reply:
		case <-ctx.Done():
			return fmt.Errorf("session: loop not responding: %w", ctx.Err())
		}
		select {
		case <-reply:
		case <-ctx.Done():
			return fmt.Errorf("session: loop not responding: %w", ctx.Err())
		}
	}
	return nil
}

func (s *Session) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *Session) touch() { s.lastExch.Store(time.Now().UnixNano()) }

func (s *Session) nextRID() string {
	return s.ridPrefix + strconv.FormatUint(s.ridSeq.Add(1), 16)
}

func (s *Session) current() *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// Run holds the session until ctx is done: connect, subscribe, GET the twin,
// serve, and reconnect with backoff when the connection ends. A cancelled
// ctx is a normal stop and returns nil.
func (s *Session) Run(ctx context.Context) error {
	if !s.started.CompareAndSwap(false, true) {
		return ErrClosed
	}
	s.runCtx = ctx // before the first connect: calls start from paho's goroutines
	var wg sync.WaitGroup
	wg.Go(func() { s.desiredWorker(ctx) })
	s.loop(ctx)
	wg.Wait()
	s.calls.Wait()
	return nil
}

func (s *Session) newBackoff() *backoff.ExponentialBackOff {
	return retry.NewBackoff(s.cfg.MinRetryDelay, s.cfg.MaxRetryDelay)
}

// noMethods answers every call 501 when the session has no Methods.
type noMethods struct{}

func (noMethods) ServeMethod(context.Context, string, []byte) router.Response {
	return router.Error(501, "no methods")
}
