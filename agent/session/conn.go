package session

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/iothub"
)

// conn is one MQTT connection.
type conn struct {
	client    mqtt.Client
	transport string        // TransportMQTT or TransportWebSocket
	lost      chan struct{} // closed when paho reports the connection lost
	lostOnce  sync.Once
	lostErr   error // set before lost is closed
	expires   time.Time
	lastRead  atomic.Int64 // unix nanos of the last byte from the hub (liveness.go)
}

func (c *conn) markLost(err error) {
	c.lostOnce.Do(func() {
		c.lostErr = err
		close(c.lost)
	})
}

func (s *Session) loop(ctx context.Context) {
	b := s.newBackoff()
	for ctx.Err() == nil {
		tr := s.cfg.Transport
		if s.auto != nil {
			tr = s.auto.next(time.Now())
		}
		c, err := s.identifyAndConnect(ctx, tr)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if s.auto != nil && s.auto.failed(tr, err) {
				// The other transport, at once. The backoff goes on
				// growing: with the hub unreachable over both, the
				// switches must not turn the retries into a hot loop.
				s.log.Warn("hub connect failed; trying the other transport", zap.String("transport", tr), zap.String("addr", s.dialAddr(tr)), zap.Error(err))
				continue
			}
			d := retry.Next(b)
			s.mu.Lock()
			s.health.RetryAt = time.Now().Add(d)
			s.health.LastError = err.Error()
			s.mu.Unlock()
			s.notify()
			if errors.Is(err, ErrRejected) {
				s.rejected = err
			}
			s.log.Warn("hub connect failed", zap.String("transport", tr), zap.String("addr", s.dialAddr(tr)), zap.Duration("retry_in", d), zap.Error(err))
			if s.pause(ctx, d) != nil {
				return
			}
			continue
		}
		if s.auto != nil {
			s.auto.connected(tr, time.Now())
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

// identifyAndConnect makes sure the session has an identity, then connects.
func (s *Session) identifyAndConnect(ctx context.Context, tr string) (*conn, error) {
	if err := s.identify(ctx); err != nil {
		return nil, err
	}
	return s.connect(ctx, tr)
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
func (s *Session) connect(ctx context.Context, tr string) (*conn, error) {
	pw, exp, err := s.password(time.Now())
	if err != nil {
		return nil, err
	}
	c := &conn{lost: make(chan struct{}), expires: exp, transport: tr}
	addr := s.dialAddr(tr)
	s.mu.Lock()
	s.health.RetryAt = time.Time{}
	s.health.Transport = tr
	s.mu.Unlock()
	s.notify()
	s.log.Debug("connecting", zap.String("transport", tr), zap.String("addr", addr), zap.String("device_id", s.clientID))

	client := mqtt.NewClient(s.clientOptions(c, pw))
	tok := client.Connect()
	if err := s.await(ctx, nil, tok.Done(), s.cfg.ConnectTimeout+5*time.Second); err != nil {
		// Give paho a moment to finish the attempt so no goroutine is left
		// behind, then drop it.
		select {
		case <-tok.Done():
		case <-time.After(2 * time.Second):
		}
		client.Disconnect(0)
		return nil, &networkError{fmt.Errorf("connect to %s (%s): %w", addr, tr, err)}
	}
	if err := tok.Error(); err != nil {
		if ct, ok := tok.(*mqtt.ConnectToken); ok && ct.ReturnCode() >= 0x03 && ct.ReturnCode() <= 0x05 {
			err = fmt.Errorf("%w: %w", ErrRejected, err)
		}
		return nil, classify(tok, fmt.Errorf("connect to %s (%s): %w%s", addr, tr, err, s.connectHint(tok, err)))
	}
	c.client = client
	if err := s.subscribe(ctx, c); err != nil {
		client.Disconnect(0)
		return nil, err
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
	s.log.Info("connected", zap.String("transport", tr), zap.String("addr", addr), zap.String("device_id", s.clientID))

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

// clientOptions are paho's options for connection c with CONNECT password
// pw (empty for X.509).
func (s *Session) clientOptions(c *conn, pw string) *mqtt.ClientOptions {
	_, broker := s.target(c.transport)
	opts := mqtt.NewClientOptions().
		AddBroker(broker).
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
		// Pings are scheduled so that a dead link is noticed within
		// KeepAlive (liveness.go).
		SetKeepAlive(s.keepAlive.pingEvery).
		SetPingTimeout(s.keepAlive.pingTimeout).
		SetCustomOpenConnectionFn(s.dialer(c)).
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
	return opts
}

// subscribe subscribes c to twin answers, methods and desired patches; a
// filter the hub refuses (0x80) is an error.
func (s *Session) subscribe(ctx context.Context, c *conn) error {
	sub := c.client.SubscribeMultiple(subscriptions, s.onMessage(c))
	if err := s.await(ctx, c, sub.Done(), s.cfg.RequestTimeout); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	if err := sub.Error(); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	if st, ok := sub.(*mqtt.SubscribeToken); ok {
		for filter, code := range st.Result() {
			if code == 0x80 {
				return fmt.Errorf("subscribe: the hub refused %s", filter)
			}
		}
	}
	return nil
}

// connectHint says what to change when a connect failed for a reason the
// device's configuration decides: the TLS trust and name, the key, the id.
func (s *Session) connectHint(tok mqtt.Token, err error) string {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &ua) && s.cfg.RootCAs != nil:
		return " (hub.caFile does not hold the CA that signed the hub's certificate: set it to that CA's PEM file)"
	case errors.As(err, &ua):
		return " (the hub's certificate is not from a CA this system trusts: for a private hub such as gwhub or IoT Edge, set hub.caFile to its CA's PEM file, e.g. gwhub's ca.pem)"
	case errors.As(err, &hn):
		return fmt.Sprintf(" (the hub's certificate is not for %s, the name TLS checks: it comes from HostName or GatewayHostName of the connection string, never from hub.address; run gwhub with --hostname %s)", s.tlsName, s.tlsName)
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return " (check the clock: the certificate is not valid at this device's time)"
	}
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
