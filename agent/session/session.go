package session

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	mqtt "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

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

// MethodFunc answers a direct method. It runs on a session worker goroutine
// with the session's context. status and body become the response (body
// must be valid JSON); after, when not nil, runs once the response has been
// published (or failed to be), e.g. to reboot only after saying so.
type MethodFunc func(ctx context.Context, name string, payload []byte) (status int, body []byte, after func())

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

// Config configures a Session. Conn is required; zero durations take the
// defaults noted.
type Config struct {
	Conn iothub.ConnectionString
	// Address is "host:port" to dial; empty means GatewayHostName (or
	// HostName) on DefaultPort. TLS verifies GatewayHostName or HostName.
	Address string
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
	// MethodWorkers bounds concurrent method calls (default 4); calls beyond
	// them and a small queue are answered 503 at once.
	MethodWorkers int

	Log       *zap.Logger
	OnMethod  MethodFunc
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
	if c.MaxRetryDelay < c.MinRetryDelay {
		c.MaxRetryDelay = c.MinRetryDelay
	}
	if c.MethodWorkers <= 0 {
		c.MethodWorkers = 4
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.OnMethod == nil {
		c.OnMethod = func(context.Context, string, []byte) (int, []byte, func()) {
			return 501, []byte(`{"error":"no methods"}`), nil
		}
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
	addr      string // dial address
	tlsName   string // name TLS verifies
	clientID  string
	username  string
	ridPrefix string
	ridSeq    atomic.Uint64
	lastExch  atomic.Int64 // unix nanos of the last message from the hub
	draining  atomic.Bool  // answer new method calls 503
	started   atomic.Bool

	methods      chan methodCall    // hub method calls → method workers
	desired      chan desiredMsg    // hub order → the desired worker
	resync       chan struct{}      // cap 1: the desired queue overflowed, GET again
	probeLoop    chan chan struct{} // health probes of the connection loop
	probeDesired chan chan struct{} // health probes of the desired worker
	changed      chan struct{}      // cap 1: Health changed
	extra        sync.WaitGroup     // goroutines answering overflowed method calls

	mu      sync.Mutex          // guards cur, pending, health
	cur     *conn               // the live connection; nil offline
	pending map[string]*pending // twin requests awaiting $iothub/twin/res
	health  Health
}

// conn is one MQTT connection.
type conn struct {
	client   mqtt.Client
	lost     chan struct{} // closed when paho reports the connection lost
	lostOnce sync.Once
	lostErr  error // set before lost is closed
	expires  time.Time
}

func (c *conn) markLost(err error) {
	c.lostOnce.Do(func() {
		c.lostErr = err
		close(c.lost)
	})
}

type pending struct {
	get  bool
	done chan struct{} // closed once rep is set
	once sync.Once
	rep  reply
}

type reply struct {
	status  int
	version int64
	body    []byte
	err     error
}

func (p *pending) complete(r reply) {
	p.once.Do(func() {
		p.rep = r
		close(p.done)
	})
}

type methodCall struct {
	c       *conn
	name    string
	rid     string
	payload []byte
}

type desiredMsg = Desired

// New checks cfg and prepares a session; nothing connects until Run.
func New(cfg Config) (*Session, error) {
	cfg.setDefaults()
	cs := cfg.Conn
	if cs.HostName == "" || cs.DeviceID == "" {
		return nil, errors.New("session: the connection string needs HostName and DeviceId")
	}
	if cs.IsService() {
		return nil, errors.New("session: a service connection string cannot connect as a device")
	}
	if cs.X509 && cfg.Certificate == nil {
		return nil, errors.New("session: x509=true needs a client certificate")
	}
	if !cs.X509 && cs.SharedAccessKey == "" && cs.SharedAccessSignature == "" {
		return nil, errors.New("session: no credentials (SharedAccessKey, SharedAccessSignature or x509=true)")
	}
	host := cs.HostName
	if cs.GatewayHostName != "" {
		host = cs.GatewayHostName
	}
	addr := cfg.Address
	if addr == "" {
		addr = net.JoinHostPort(host, DefaultPort)
	}
	id := cs.DeviceID
	if cs.ModuleID != "" {
		// Module identities use "{device}/{module}" as client id and in the
		// username (ids are never URL-encoded there).
		id += "/" + cs.ModuleID
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("session: rid prefix: %w", err)
	}
	s := &Session{
		cfg:          cfg,
		log:          cfg.Log,
		addr:         addr,
		tlsName:      host,
		clientID:     id,
		username:     iothub.Username(cs.HostName, id, cfg.ClientType),
		ridPrefix:    hex.EncodeToString(b[:]) + "-",
		methods:      make(chan methodCall, 2*cfg.MethodWorkers),
		desired:      make(chan desiredMsg, 32),
		resync:       make(chan struct{}, 1),
		probeLoop:    make(chan chan struct{}),
		probeDesired: make(chan chan struct{}),
		changed:      make(chan struct{}, 1),
		pending:      map[string]*pending{},
		health:       Health{Host: host, Since: time.Now()},
	}
	return s, nil
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
	var wg sync.WaitGroup
	wg.Go(func() { s.desiredWorker(ctx) })
	for range s.cfg.MethodWorkers {
		wg.Go(func() { s.methodWorker(ctx) })
	}
	s.loop(ctx)
	wg.Wait()
	s.extra.Wait()
	return nil
}

func (s *Session) newBackoff() *backoff.ExponentialBackOff {
	return retry.NewBackoff(s.cfg.MinRetryDelay, s.cfg.MaxRetryDelay)
}

func (s *Session) loop(ctx context.Context) {
	b := s.newBackoff()
	for ctx.Err() == nil {
		c, err := s.connect(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := retry.Next(b)
			s.mu.Lock()
			s.health.RetryAt = time.Now().Add(d)
			s.health.LastError = err.Error()
			s.mu.Unlock()
			s.notify()
			s.log.Warn("hub connect failed", zap.String("addr", s.addr), zap.Duration("retry_in", d), zap.Error(err))
			if s.pause(ctx, d) != nil {
				return
			}
			continue
		}
		b.Reset()
		planned := s.serve(ctx, c)
		s.teardown(c)
		if ctx.Err() != nil {
			return
		}
		if planned {
			continue // a token renewal reconnects at once
		}
		d := retry.Next(b)
		s.mu.Lock()
		s.health.RetryAt = time.Now().Add(d)
		s.mu.Unlock()
		s.notify()
		if s.pause(ctx, d) != nil {
			return
		}
	}
}

// pause waits d, answering health probes.
func (s *Session) pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		case p := <-s.probeLoop:
			close(p)
		}
	}
}

var (
	errLost    = errors.New("connection lost")
	errTimeout = errors.New("timed out")
)

// await waits for done, bounded by d, answering health probes; c, when not
// nil, ends the wait if its connection is lost.
func (s *Session) await(ctx context.Context, c *conn, done <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	var lost <-chan struct{}
	if c != nil {
		lost = c.lost
	}
	for {
		select {
		case <-done:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-lost:
			return errLost
		case <-t.C:
			return errTimeout
		case p := <-s.probeLoop:
			close(p)
		}
	}
}

func (s *Session) tlsConfig() *tls.Config {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: s.tlsName,
		RootCAs:    s.cfg.RootCAs,
	}
	if s.cfg.Certificate != nil {
		cfg.Certificates = []tls.Certificate{*s.cfg.Certificate}
	}
	return cfg
}

// password mints the CONNECT password: a fresh SAS token, the fixed one from
// the connection string, or none for X.509.
func (s *Session) password(now time.Time) (string, time.Time, error) {
	cs := s.cfg.Conn
	switch {
	case cs.X509:
		return "", time.Time{}, nil
	case cs.SharedAccessSignature != "":
		return cs.SharedAccessSignature, time.Time{}, nil
	}
	key, err := cs.Key()
	if err != nil {
		return "", time.Time{}, err
	}
	// se has whole seconds: the token expires at the truncated time, and
	// the renewal is planned from that.
	exp := time.Unix(now.Add(s.cfg.SASTTL).Unix(), 0)
	return iothub.NewSAS(cs.Resource(), key, "", exp), exp, nil
}

var subscriptions = map[string]byte{
	iothub.TwinResponseFilter: 1,
	iothub.MethodsFilter:      0,
	iothub.DesiredFilter:      1,
}

// connect opens a connection, subscribes, marks the session online and GETs
// the twin.
func (s *Session) connect(ctx context.Context) (*conn, error) {
	pw, exp, err := s.password(time.Now())
	if err != nil {
		return nil, err
	}
	c := &conn{lost: make(chan struct{}), expires: exp}
	opts := mqtt.NewClientOptions().
		AddBroker("tls://" + s.addr).
		SetClientID(s.clientID).
		SetUsername(s.username).
		SetTLSConfig(s.tlsConfig()).
		// IoT Hub speaks 3.1.1 only; an unset version makes paho fall back
		// to 3.1 after a refused CONNACK and hide the real error.
		SetProtocolVersion(4).
		// Every connect re-subscribes and re-reads the twin, and the hub
		// queues neither methods nor desired patches for an offline device,
		// so a persistent session would only bring back stale requests.
		SetCleanSession(true).
		// Reconnection is ours: a fresh token each time, jittered backoff.
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(s.cfg.KeepAlive).
		SetPingTimeout(min(30*time.Second, s.cfg.KeepAlive/2)).
		SetConnectTimeout(s.cfg.ConnectTimeout).
		SetWriteTimeout(s.cfg.RequestTimeout).
		// In order, so a twin GET answer and the desired patches after it
		// reach the desired worker in the hub's order; handlers never block.
		SetOrderMatters(true).
		SetDefaultPublishHandler(s.onMessage(c)).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			c.markLost(err)
		})
	if pw != "" {
		opts.SetPassword(pw)
	}
	s.mu.Lock()
	s.health.RetryAt = time.Time{}
	s.mu.Unlock()
	s.notify()
	s.log.Debug("connecting", zap.String("addr", s.addr), zap.String("device_id", s.clientID))

	client := mqtt.NewClient(opts)
	tok := client.Connect()
	if err := s.await(ctx, nil, tok.Done(), s.cfg.ConnectTimeout+5*time.Second); err != nil {
		// Give paho a moment to finish the attempt so no goroutine is left
		// behind, then drop it.
		select {
		case <-tok.Done():
		case <-time.After(2 * time.Second):
		}
		client.Disconnect(0)
		return nil, fmt.Errorf("connect to %s: %w", s.addr, err)
	}
	if err := tok.Error(); err != nil {
		return nil, fmt.Errorf("connect to %s: %w%s", s.addr, err, connectHint(tok))
	}
	c.client = client

	sub := client.SubscribeMultiple(subscriptions, s.onMessage(c))
	if err := s.await(ctx, c, sub.Done(), s.cfg.RequestTimeout); err != nil {
		client.Disconnect(0)
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	if err := sub.Error(); err != nil {
		client.Disconnect(0)
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	if st, ok := sub.(*mqtt.SubscribeToken); ok {
		for filter, code := range st.Result() {
			if code == 0x80 {
				client.Disconnect(0)
				return nil, fmt.Errorf("subscribe: the hub refused %s", filter)
			}
		}
	}

	s.mu.Lock()
	s.cur = c
	s.health.Connected = true
	s.health.Since = time.Now()
	s.health.LastError = ""
	s.health.Connects++
	s.mu.Unlock()
	s.touch()
	s.notify()
	s.log.Info("connected", zap.String("addr", s.addr), zap.String("device_id", s.clientID))

	if err := s.getTwin(ctx, c); err != nil {
		if errors.Is(err, errLost) || ctx.Err() != nil {
			// serve notices and reconnects.
			s.log.Warn("twin GET after connect failed", zap.Error(err))
		} else {
			s.log.Warn("twin GET after connect failed; retrying", zap.Error(err))
			s.requestResync()
		}
	}
	s.cfg.OnConnect()
	return c, nil
}

func connectHint(tok mqtt.Token) string {
	ct, ok := tok.(*mqtt.ConnectToken)
	if !ok {
		return ""
	}
	switch ct.ReturnCode() {
	case 0x04, 0x05:
		return " (check the device key and that the clock is right: tokens are checked against the hub's time)"
	case 0x02:
		return " (the hub refused the client id: check DeviceId)"
	}
	return ""
}

func (s *Session) requestResync() {
	select {
	case s.resync <- struct{}{}:
	default:
	}
}

// serve keeps the connection until it is lost, the token needs renewal or
// ctx ends. It reports whether the reconnect is a planned one.
func (s *Session) serve(ctx context.Context, c *conn) (planned bool) {
	var renew <-chan time.Time
	if !c.expires.IsZero() {
		d := time.Duration(float64(time.Until(c.expires)) * renewFraction)
		t := time.NewTimer(d)
		defer t.Stop()
		renew = t.C
	}
	var again *time.Timer
	var retryC <-chan time.Time
	defer func() {
		if again != nil {
			again.Stop()
		}
	}()
	gb := s.newBackoff()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-c.lost:
			s.log.Warn("connection lost", zap.Error(c.lostErr))
			s.mu.Lock()
			s.health.LastError = fmt.Sprint(c.lostErr)
			s.health.Drops++
			s.mu.Unlock()
			return false
		case <-renew:
			s.log.Info("renewing the SAS token: reconnecting", zap.Time("expires", c.expires))
			s.mu.Lock()
			s.health.Renewals++
			s.mu.Unlock()
			return true
		case <-s.resync:
			retryC = nil
		case <-retryC:
			retryC = nil
		case p := <-s.probeLoop:
			close(p)
			continue
		}
		if err := s.getTwin(ctx, c); err != nil {
			if errors.Is(err, errLost) || ctx.Err() != nil {
				continue
			}
			d := retry.Next(gb)
			s.log.Warn("twin GET failed", zap.Duration("retry_in", d), zap.Error(err))
			if again == nil {
				again = time.NewTimer(d)
			} else {
				again.Reset(d)
			}
			retryC = again.C
		} else {
			gb.Reset()
		}
	}
}

// teardown marks the session offline, fails the twin requests in flight and
// closes the connection.
func (s *Session) teardown(c *conn) {
	s.mu.Lock()
	if s.cur == c {
		s.cur = nil
	}
	s.health.Connected = false
	s.health.Since = time.Now()
	waiting := s.pending
	s.pending = map[string]*pending{}
	s.mu.Unlock()
	for _, p := range waiting {
		p.complete(reply{err: iothub.ErrNotConnected})
	}
	s.notify()
	c.markLost(errors.New("closed"))
	if c.client.IsConnectionOpen() {
		c.client.Disconnect(250)
	}
}

func (s *Session) register(get bool) (string, *pending) {
	rid := s.nextRID()
	p := &pending{get: get, done: make(chan struct{})}
	s.mu.Lock()
	s.pending[rid] = p
	s.mu.Unlock()
	return rid, p
}

func (s *Session) unregister(rid string) {
	s.mu.Lock()
	delete(s.pending, rid)
	s.mu.Unlock()
}

// getTwin GETs the twin; the answer's desired section reaches the desired
// worker from the message handler, in order with the patches.
func (s *Session) getTwin(ctx context.Context, c *conn) error {
	rid, p := s.register(true)
	defer s.unregister(rid)
	tok := c.client.Publish(iothub.TwinGetTopic(rid), 0, false, []byte{})
	if err := s.await(ctx, c, tok.Done(), s.cfg.RequestTimeout); err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	if err := s.await(ctx, c, p.done, s.cfg.RequestTimeout); err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	if p.rep.err != nil {
		return fmt.Errorf("twin GET: %w", p.rep.err)
	}
	if p.rep.status != 200 {
		return fmt.Errorf("twin GET: hub answered %d: %s", p.rep.status, bytes.TrimSpace(p.rep.body))
	}
	return nil
}

// PatchReported publishes a reported-properties patch and waits, bounded,
// for the hub's answer. It implements twin.Publisher: iothub.ErrNotConnected
// when offline or when the connection drops, *iothub.StatusError for an answer
// other than 204, ErrTimeout for no answer.
func (s *Session) PatchReported(ctx context.Context, body []byte) (int64, error) {
	c := s.current()
	if c == nil {
		return 0, iothub.ErrNotConnected
	}
	rid, p := s.register(false)
	defer s.unregister(rid)
	t := time.NewTimer(s.cfg.RequestTimeout)
	defer t.Stop()
	tok := c.client.Publish(iothub.TwinReportedTopic(rid), 1, false, body)
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return 0, fmt.Errorf("%w: %v", iothub.ErrNotConnected, err)
		}
	case <-p.done: // the answer can overtake the PUBACK's token completion
	case <-c.lost:
		return 0, iothub.ErrNotConnected
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-t.C:
		return 0, fmt.Errorf("%w: reported patch %s not acknowledged in %s", ErrTimeout, rid, s.cfg.RequestTimeout)
	}
	select {
	case <-p.done:
	case <-c.lost:
		return 0, iothub.ErrNotConnected
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-t.C:
		return 0, fmt.Errorf("%w: no answer to reported patch %s in %s", ErrTimeout, rid, s.cfg.RequestTimeout)
	}
	r := p.rep
	switch {
	case r.err != nil:
		return 0, r.err
	case r.status == 204 || r.status == 200:
		return r.version, nil
	}
	return 0, &iothub.StatusError{Status: r.status, Body: r.body}
}

// onMessage is paho's handler for everything the hub sends on connection c.
// It runs on paho's router goroutine: it only decodes and hands on, never
// publishes or waits.
func (s *Session) onMessage(c *conn) mqtt.MessageHandler {
	return func(_ mqtt.Client, m mqtt.Message) {
		s.touch()
		t, err := iothub.ParseTopic(m.Topic())
		if err != nil {
			s.log.Debug("ignoring message on an unknown topic", zap.String("topic", m.Topic()))
			return
		}
		switch t.Kind {
		case iothub.KindMethodRequest:
			s.onMethod(methodCall{c: c, name: t.Method, rid: t.RID, payload: m.Payload()})
		case iothub.KindTwinResponse:
			s.onTwinResponse(t, m.Payload())
		case iothub.KindDesiredPatch:
			doc, err := iothub.DecodeObject(m.Payload())
			if err != nil {
				s.log.Warn("undecodable desired patch: reading the whole twin instead", zap.Int64("version", t.Version), zap.Error(err))
				s.requestResync()
				return
			}
			delete(doc, "$version")
			s.toDesired(Desired{Doc: doc, Version: t.Version})
		default:
			s.log.Debug("ignoring message", zap.String("topic", m.Topic()))
		}
	}
}

func (s *Session) onMethod(call methodCall) {
	if s.draining.Load() {
		s.answerLater(call, 503, `{"error":"the agent is stopping"}`)
		return
	}
	select {
	case s.methods <- call:
	default:
		s.answerLater(call, 503, `{"error":"too many method calls in progress"}`)
	}
}

// answerLater publishes a canned answer off paho's router goroutine.
func (s *Session) answerLater(call methodCall, status int, body string) {
	s.extra.Go(func() { s.respond(call, status, []byte(body)) })
}

func (s *Session) onTwinResponse(t iothub.Topic, body []byte) {
	s.mu.Lock()
	p := s.pending[t.RID]
	delete(s.pending, t.RID)
	s.mu.Unlock()
	if p == nil {
		s.log.Debug("twin answer for no request in flight", zap.String("rid", t.RID), zap.Int("status", t.Status))
		return
	}
	if p.get && t.Status == 200 {
		doc, version, reported, err := decodeGet(body)
		if err != nil {
			p.complete(reply{err: err})
			return
		}
		s.toDesired(Desired{Doc: doc, Version: version, Full: true, Reported: reported})
	}
	p.complete(reply{status: t.Status, version: t.Version, body: body})
}

// decodeGet reads the desired section with its $version, and the reported
// section, from a twin GET answer
// ({"desired":{…,"$version":N},"reported":{…,"$version":M}}).
func decodeGet(body []byte) (desired map[string]any, version int64, reported map[string]any, err error) {
	doc, err := iothub.DecodeObject(body)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("twin GET answer: %w", err)
	}
	desired, ok := doc["desired"].(map[string]any)
	if !ok {
		return nil, 0, nil, errors.New("twin GET answer has no desired object")
	}
	if version, err = versionOf(desired["$version"]); err != nil {
		return nil, 0, nil, fmt.Errorf("twin GET answer: desired %w", err)
	}
	delete(desired, "$version")
	reported, _ = doc["reported"].(map[string]any)
	if reported == nil {
		reported = map[string]any{}
	}
	delete(reported, "$version")
	return desired, version, reported, nil
}

func versionOf(v any) (int64, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, errors.New("$version is missing or not a number")
	}
	i, err := n.Int64()
	if err != nil || i < 0 {
		return 0, fmt.Errorf("$version %s is not a version", n)
	}
	return i, nil
}

func (s *Session) toDesired(m desiredMsg) {
	select {
	case s.desired <- m:
	default:
		// Never block the router: drop it and read the whole twin, which
		// carries every change that was dropped.
		s.log.Warn("desired queue full: reading the whole twin instead", zap.Int64("version", m.Version))
		s.requestResync()
	}
}

// desiredWorker applies desired changes in order, ignoring patches the
// twin GET already covered.
func (s *Session) desiredWorker(ctx context.Context) {
	var applied int64 = -1
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-s.probeDesired:
			close(p)
		case m := <-s.desired:
			switch {
			case m.Full && m.Version == applied:
				continue // nothing changed while we were away
			case !m.Full && m.Version <= applied:
				s.log.Debug("ignoring desired patch already applied", zap.Int64("version", m.Version), zap.Int64("applied", applied))
				continue
			}
			// A full document with a lower version than applied means the
			// twin was recreated: it is the truth, take it.
			applied = m.Version
			s.deliverDesired(m)
		}
	}
}

func (s *Session) deliverDesired(m desiredMsg) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("desired handler panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
		}
	}()
	s.cfg.OnDesired(m)
}

func (s *Session) methodWorker(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case call := <-s.methods:
			status, body, after := s.callMethod(ctx, call)
			s.respond(call, status, body)
			if after != nil {
				after()
			}
		}
	}
}

func (s *Session) callMethod(ctx context.Context, call methodCall) (status int, body []byte, after func()) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("method handler panicked", zap.String("method", call.name), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			status, body, after = 500, []byte(`{"error":"internal error"}`), nil
		}
	}()
	return s.cfg.OnMethod(ctx, call.name, call.payload)
}

// respond publishes a method response on the connection the call came in
// on, with the call's rid.
func (s *Session) respond(call methodCall, status int, body []byte) {
	tok := call.c.client.Publish(iothub.MethodResponseTopic(status, call.rid), 1, false, body)
	t := time.NewTimer(s.cfg.RequestTimeout)
	defer t.Stop()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			s.log.Warn("method response not sent", zap.String("method", call.name), zap.String("rid", call.rid), zap.Error(err))
			return
		}
		s.touch()
		s.log.Debug("method answered", zap.String("method", call.name), zap.String("rid", call.rid), zap.Int("status", status))
	case <-call.c.lost:
		s.log.Warn("method response not sent: connection lost", zap.String("method", call.name), zap.String("rid", call.rid))
	case <-t.C:
		s.log.Warn("method response not acknowledged", zap.String("method", call.name), zap.String("rid", call.rid))
	}
}
